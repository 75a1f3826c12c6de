"""One pass of a model over every example, on every replica, gathered by example index.

The self-labelling pass (log-probabilities per head), the evaluation passes (features, pooled probe
activations, head predictions) and the kNN search all run a function over batches of
{"index", ...} on each replica of a `tf.distribute` strategy and need the results of all replicas, of
all workers, in example order. `IndexedPass` is that loop, written once.
"""

import logging
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)


class IndexedPass:
  """Runs `replica_fn` over distributed batches and collects its outputs by example index.

  Args:
    strategy: the `tf.distribute` strategy whose replicas run the function.
    replica_fn: `batch -> (index, outputs)`, run on each replica inside `strategy.run`: `batch` is a
      dict with at least "index" (int [B]); `outputs` a nest (list, tuple or dict) of tensors [B, ...].

  Call it with a dataset covering indices [0, num_examples) once each: it returns the nest of numpy
  arrays [num_examples, ...]. It raises a ValueError when an index is outside that range, missing
  or repeated, naming the counts.
  """

  def __init__(self, strategy: tf.distribute.Strategy, replica_fn: Callable):
    self.strategy = strategy
    self._step = tf.function(lambda batch: strategy.run(replica_fn, args=(batch,)))

  def __call__(self, dataset: tf.data.Dataset, num_examples: int, *, description: str = "pass",
               verbose: int = 0, allocate: Optional[Callable] = None):
    """Returns the outputs of every example, in index order.

    Args:
      dataset: batches of {"index", ...}, every index of [0, num_examples) exactly once.
      num_examples: N.
      description: what the pass is, for the log line and the error messages.
      verbose: 1 shows a progress bar.
      allocate: `(shape, dtype) -> array` that each output is written into by `array[index] = values`
        (default: a numpy array in memory; e.g. `label_store.FeatureFile.allocator(directory)`).
    """
    allocate = allocate or np.zeros
    start = time.perf_counter()
    seen = np.zeros(num_examples, np.int64)
    flat_outputs, structure = None, None
    progress = None
    if verbose:
      batches = int(dataset.cardinality())
      # A line every few seconds at most where the output is a log file rather than a terminal.
      progress = keras.utils.Progbar(batches if batches > 0 else None, interval=5.0, unit_name="batch")
    for step, batch in enumerate(self.strategy.experimental_distribute_dataset(dataset)):
      index, outputs = self._gather(self._step(batch))
      if index.size:
        if index.min() < 0 or index.max() >= num_examples:
          raise ValueError(f"{description}: the dataset yielded index {index.min()}...{index.max()}, "
                           f"outside [0, {num_examples})")
        flat = tf.nest.flatten(outputs)
        if flat_outputs is None:
          structure = outputs
          flat_outputs = [allocate((num_examples,) + value.shape[1:], value.dtype) for value in flat]
        for target, value in zip(flat_outputs, flat):
          target[index] = value
        np.add.at(seen, index, 1)
      if progress is not None:
        progress.update(step + 1)
    if flat_outputs is None or not np.all(seen == 1):
      missing, repeated = int(np.sum(seen == 0)), int(np.sum(seen > 1))
      raise ValueError(f"{description}: the dataset must yield every index in [0, {num_examples}) once; "
                       f"{missing} missing, {repeated} repeated")
    logger.info("%s: %d examples in %.1f s on %d replica(s)", description, num_examples,
                time.perf_counter() - start, self.strategy.num_replicas_in_sync)
    return tf.nest.pack_sequence_as(structure, flat_outputs)

  def _gather(self, per_replica):
    """(index, outputs) of every replica, on every worker, as numpy."""
    if self.strategy.num_replicas_in_sync == 1:
      result = self.strategy.experimental_local_results(per_replica)[0]
    else:
      # An all-gather: with several workers, local results would hold only this worker's share. Leaf
      # by leaf: strategy.gather of a whole structure returns the first replica's alone.
      result = tf.nest.map_structure(lambda value: self.strategy.gather(value, axis=0), per_replica)
    return tf.nest.map_structure(np.asarray, result)



class ShardedPass:
  """`IndexedPass` without the gathering: each replica keeps the outputs of the examples it ran.

  For data too large to hold whole on every worker (the ImageNet label pass): nothing crosses the
  network during the pass. Call it with a dataset covering indices [0, num_examples) once each; it
  returns `(index, outputs)` as distributed values of the strategy: replica r's int64 [N_r] indices
  and its nest of [N_r, ...] outputs, on its own device (N_r = 0 for a replica that got no examples).
  `check_indices` verifies, once the indices have been gathered (e.g. with the labels), that they
  cover [0, num_examples) once each.
  """

  def __init__(self, strategy: tf.distribute.Strategy, replica_fn: Callable):
    self.strategy = strategy

    def replica_step(batch):
      index, outputs = replica_fn(batch)
      return tf.distribute.get_replica_context().replica_id_in_sync_group, index, outputs

    self._step = tf.function(lambda batch: strategy.run(replica_step, args=(batch,)))

  def __call__(self, dataset: tf.data.Dataset, num_examples: int, *, description: str = "pass",
               verbose: int = 0):
    start = time.perf_counter()
    parts, replica_ids, structure = None, None, None
    progress = None
    if verbose:
      batches = int(dataset.cardinality())
      progress = keras.utils.Progbar(batches if batches > 0 else None, interval=5.0, unit_name="batch")
    for step, batch in enumerate(self.strategy.experimental_distribute_dataset(dataset)):
      ids, index, outputs = (self.strategy.experimental_local_results(v) for v in self._step(batch))
      if parts is None:
        replica_ids = [int(i) for i in ids]
        structure = outputs[0]
        parts = [[] for _ in ids]
      for r, (i, o) in enumerate(zip(index, outputs)):
        parts[r].append((i, tf.nest.flatten(o)))
      if progress is not None:
        progress.update(step + 1)
    if parts is None:
      raise ValueError(f"{description}: the dataset is empty; it must yield every index in "
                       f"[0, {num_examples}) once")
    shards = []
    for replica_parts in parts:
      with tf.device(replica_parts[0][0].device):
        index = tf.concat([i for i, _ in replica_parts], 0)
        flat = [tf.concat(list(values), 0) for values in zip(*(o for _, o in replica_parts))]
      shards.append((index, tf.nest.pack_sequence_as(structure, flat)))
    position = {replica_id: r for r, replica_id in enumerate(replica_ids)}
    values = self.strategy.experimental_distribute_values_from_function(
        lambda context: shards[position[context.replica_id_in_sync_group]])
    local_examples = sum(int(index.shape[0]) for index, _ in shards)
    total = int(self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(
        lambda v: tf.shape(v[0], out_type=tf.int64)[0], args=(values,)), axis=None))
    if total != num_examples:
      raise ValueError(f"{description}: the dataset must yield every index in [0, {num_examples}) once; "
                       f"it yielded {total} examples")
    logger.info("%s: %d examples in %.1f s on %d replica(s), %d kept on this worker", description,
                num_examples, time.perf_counter() - start, self.strategy.num_replicas_in_sync,
                local_examples)
    return (self.strategy.run(lambda v: v[0], args=(values,)),
            self.strategy.run(lambda v: v[1], args=(values,)))

  @staticmethod
  def check_indices(index: np.ndarray, num_examples: int, description: str = "pass"):
    """Raises a ValueError unless `index` holds every index of [0, num_examples) exactly once."""
    index = np.asarray(index)
    if index.size and (index.min() < 0 or index.max() >= num_examples):
      raise ValueError(f"{description}: the dataset yielded index {index.min()}...{index.max()}, outside "
                       f"[0, {num_examples})")
    seen = np.bincount(index, minlength=num_examples) if index.size else np.zeros(num_examples, np.int64)
    if not np.all(seen == 1):
      raise ValueError(f"{description}: the dataset must yield every index in [0, {num_examples}) once; "
                       f"{int(np.sum(seen == 0))} missing, {int(np.sum(seen > 1))} repeated")
