"""The hardware-dependent choice of a fast dtype policy (--label_pass_precision=auto)."""

import re

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


def _cpuinfo_flags():
  """This machine's CPU flags, read independently of precision.cpu_flags (empty where there are none)."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return set()
  match = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)
  return set(match.group(1).split()) if match else set()


def test_cpu_flags_of_this_machine_agree_with_its_cpuinfo():
  assert precision.cpu_flags() == _cpuinfo_flags()


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
    ("XPU", None, None, None),  # a pluggable device: float32
])
def test_fast_mixed_policy(device, cpu, gpus, expected):
  assert precision.fast_mixed_policy(device, cpu=cpu, gpus=gpus) == expected


def test_device_type_of_strategies(mirrored_strategy):
  default = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"  # where TF places an op
  assert distribution.device_type(tf.distribute.get_strategy()) == default  # the default strategy
  assert distribution.device_type(mirrored_strategy) == "CPU"  # the two logical CPUs
  assert distribution.device_type(tf.distribute.OneDeviceStrategy("/cpu:0")) == "CPU"


@pytest.mark.parametrize("flags, mixed_training, expected", [
    ({"avx2", "avx512_bf16"}, False, "mixed_bfloat16"),
    ({"avx2"}, False, "model"),
    ({"avx2", "avx512_bf16"}, True, "model"),  # training in mixed precision already: no twin
])
def test_auto_label_pass_policy_follows_the_cpu(monkeypatch, mirrored_strategy, flags, mixed_training, expected):
  monkeypatch.setattr(precision, "cpu_flags", lambda path="/proc/cpuinfo": frozenset(flags))
  assert precision.label_pass_policy("auto", mirrored_strategy, mixed_training) == expected


def test_auto_label_pass_policy_on_this_machines_cpu(mirrored_strategy):
  bfloat16 = bool(_cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})
  expected = "mixed_bfloat16" if bfloat16 else "model"
  assert precision.label_pass_policy("auto", mirrored_strategy) == expected


@pytest.mark.parametrize("name", ["model", "float32", "mixed_bfloat16", "mixed_float16"])
def test_other_label_pass_precisions_are_kept(name):
  assert precision.label_pass_policy(name, tf.distribute.get_strategy()) == name


def test_unknown_label_pass_precision_is_refused():
  with pytest.raises(ValueError, match=r"label pass precision 'int8' must be one of auto, model, float32, "
                     r"mixed_bfloat16, mixed_float16"):
    precision.label_pass_policy("int8", tf.distribute.get_strategy())
