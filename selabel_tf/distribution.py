"""What the library needs to know about a `tf.distribute` strategy beyond its public attributes."""

import tensorflow as tf


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """The number of worker processes of `strategy` (1 for a single-process strategy)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None:
    return 1
  spec = resolver.cluster_spec().as_dict()
  return max(1, len(spec.get("worker", ())) + len(spec.get("chief", ())))
