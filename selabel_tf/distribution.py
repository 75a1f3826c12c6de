"""What the library needs to know about a `tf.distribute` strategy beyond its public attributes."""

import tensorflow as tf


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """The number of worker processes of `strategy` (1 for a single-process strategy)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None:
    return 1
  spec = resolver.cluster_spec().as_dict()
  return max(1, len(spec.get("worker", ())) + len(spec.get("chief", ())))


def device_type(strategy: tf.distribute.Strategy) -> str:
  """The kind of device `strategy`'s replicas compute on: "TPU", "GPU" or "CPU" (in that order where
  they mix), or a pluggable device's type.

  The default strategy (no `strategy.scope()`) has no device list: TF places its ops on a GPU where
  there is one."""
  try:
    devices = strategy.extended.worker_devices
  except RuntimeError:  # the default strategy
    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
  kinds = {tf.DeviceSpec.from_string(device).device_type for device in devices}
  for kind in ("TPU", "GPU", "CPU"):
    if kind in kinds:
      return kind
  return sorted(kinds)[0]
