"""Which dtype policy computes fast on the hardware at hand: bfloat16 is fast only where the hardware
has bfloat16 units (CPUs with AVX512_BF16 or AMX, TPUs, NVIDIA GPUs from compute capability 8.0), and
slower than float32 on a CPU without them (measured: `benchmarks/train.py --label_pass_precision=
mixed_bfloat16,float32`, README "Training"). Volta and Turing GPUs (7.x) have float16 units only.
"""

import logging
from typing import FrozenSet, Optional, Sequence, Tuple

import tensorflow as tf

from selabel_tf import distribution

logger = logging.getLogger(__name__)

# x86 CPU flags (Linux /proc/cpuinfo) of bfloat16 matrix instructions that oneDNN uses.
CPU_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")
# The choices of --label_pass_precision: "model" (the training policy), a Keras dtype policy, or "auto".
LABEL_PASS_PRECISIONS = ("auto", "model", "float32", "mixed_bfloat16", "mixed_float16")


def cpu_flags(path: str = "/proc/cpuinfo") -> FrozenSet[str]:
  """The instruction-set flags of this machine's CPU, empty where the file is missing (not Linux)."""
  try:
    with open(path) as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
          return frozenset(value.split())
  except OSError:
    pass
  return frozenset()


def gpu_compute_capabilities() -> Tuple[Tuple[int, int], ...]:
  """The compute capability of every visible GPU, (major, minor); (0, 0) where TF does not say."""
  return tuple(tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)))
               for gpu in tf.config.list_physical_devices("GPU"))


def fast_mixed_policy(device_type: str, cpu: Optional[FrozenSet[str]] = None,
                      gpus: Optional[Sequence[Tuple[int, int]]] = None) -> Optional[str]:
  """The mixed-precision Keras policy with fast matrix units on `device_type` ("CPU", "GPU", "TPU"), or
  None where float32 is as fast: TPU and Ampere+ GPUs mixed_bfloat16, Volta/Turing GPUs mixed_float16
  (the slowest GPU decides), CPUs mixed_bfloat16 where they have one of CPU_BFLOAT16_FLAGS, other
  device types (pluggable ones) None. `cpu` and `gpus` default to this machine's (`cpu_flags()`,
  `gpu_compute_capabilities()`)."""
  if device_type == "TPU":
    return "mixed_bfloat16"
  if device_type == "GPU":
    gpus = gpu_compute_capabilities() if gpus is None else gpus
    slowest = min(gpus, default=(0, 0))
    if slowest >= (8, 0):
      return "mixed_bfloat16"
    return "mixed_float16" if slowest >= (7, 0) else None
  if device_type == "CPU":
    cpu = cpu_flags() if cpu is None else cpu
    return "mixed_bfloat16" if any(flag in cpu for flag in CPU_BFLOAT16_FLAGS) else None
  return None


def label_pass_policy(precision: str, strategy: tf.distribute.Strategy, mixed_training: bool = False) -> str:
  """The dtype policy of the label pass for --label_pass_precision=`precision` (one of
  LABEL_PASS_PRECISIONS): "auto" is the fast mixed policy of the strategy's devices, or "model" (the
  training policy) where there is none or where training is already in mixed precision
  (`mixed_training`); the others are returned as they are.

  Each process resolves "auto" on its own hardware: workers of different kinds should be given a policy."""
  if precision not in LABEL_PASS_PRECISIONS:
    raise ValueError(f"label pass precision {precision!r} must be one of {', '.join(LABEL_PASS_PRECISIONS)}")
  if precision != "auto":
    return precision
  kind = distribution.device_type(strategy)
  policy = "model" if mixed_training else fast_mixed_policy(kind) or "model"
  logger.info("--label_pass_precision=auto: %s on %s%s", policy, kind,
              " (training in mixed precision)" if mixed_training else "")
  return policy
