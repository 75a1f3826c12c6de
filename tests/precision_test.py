"""The hardware-dependent choice of a fast dtype policy (--label_pass_precision=auto)."""

import pytest
import tensorflow as tf

from selabel_tf import distribution
from selabel_tf import precision


def test_cpu_flags_reads_the_flags_line_of_cpuinfo(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                  "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
  assert precision.cpu_flags(str(path)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
  assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_cpu_flags_of_this_machine_agree_with_its_cpuinfo():
  with open("/proc/cpuinfo") as f:
    line = next(line for line in f if line.startswith("flags"))
  assert precision.cpu_flags() == set(line.split(":", 1)[1].split())


@pytest.mark.parametrize("device, cpu, gpus, expected", [
    ("CPU", {"avx2", "avx512f", "avx512_bf16"}, None, "mixed_bfloat16"),  # e.g. AMD Zen 4, Intel Cooper Lake
    ("CPU", {"avx2", "amx_bf16", "amx_tile"}, None, "mixed_bfloat16"),  # Intel Sapphire Rapids
    ("CPU", {"avx2", "fma", "avx512f"}, None, None),  # AVX-512 without bfloat16: float32
    ("CPU", frozenset(), None, None),  # flags unknown (not Linux): float32
    ("GPU", None, [(8, 0)], "mixed_bfloat16"),  # A100
    ("GPU", None, [(9, 0), (8, 6)], "mixed_bfloat16"),
    ("GPU", None, [(8, 0), (7, 0)], "mixed_float16"),  # the slowest GPU decides
    ("GPU", None, [(7, 5)], "mixed_float16"),  # T4: float16 units only
    ("GPU", None, [(6, 1)], None),
    ("GPU", None, [], None),
    ("TPU", None, None, "mixed_bfloat16"),
])
def test_fast_mixed_policy(device, cpu, gpus, expected):
  assert precision.fast_mixed_policy(device, cpu=cpu, gpus=gpus) == expected


def test_fast_mixed_policy_refuses_an_unknown_device_type():
  with pytest.raises(ValueError, match=r"device_type='NPU' must be one of CPU, GPU, TPU"):
    precision.fast_mixed_policy("NPU", cpu=frozenset())


def test_device_type_of_strategies_on_this_cpu_machine(mirrored_strategy):
  assert distribution.device_type(tf.distribute.get_strategy()) == "CPU"  # the default strategy
  assert distribution.device_type(mirrored_strategy) == "CPU"
  assert distribution.device_type(tf.distribute.OneDeviceStrategy("/cpu:0")) == "CPU"


@pytest.mark.parametrize("flags, expected", [({"avx2", "avx512_bf16"}, "mixed_bfloat16"), ({"avx2"}, "model")])
def test_auto_label_pass_policy_follows_the_cpu(monkeypatch, flags, expected):
  monkeypatch.setattr(precision, "cpu_flags", lambda path="/proc/cpuinfo": frozenset(flags))
  assert precision.label_pass_policy("auto", tf.distribute.get_strategy()) == expected


def test_auto_label_pass_policy_on_this_machine():
  with open("/proc/cpuinfo") as f:
    bfloat16 = any(flag in f.read().split() for flag in ("avx512_bf16", "amx_bf16"))
  expected = "mixed_bfloat16" if bfloat16 else "model"
  assert precision.label_pass_policy("auto", tf.distribute.get_strategy()) == expected


@pytest.mark.parametrize("name", ["model", "float32", "mixed_bfloat16", "mixed_float16"])
def test_other_label_pass_precisions_are_kept(name):
  assert precision.label_pass_policy(name, tf.distribute.get_strategy()) == name


def test_unknown_label_pass_precision_is_refused():
  with pytest.raises(ValueError, match=r"label pass precision 'int8' must be one of auto, model, float32, "
                     r"mixed_bfloat16, mixed_float16"):
    precision.label_pass_policy("int8", tf.distribute.get_strategy())
