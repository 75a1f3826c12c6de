"""One pass of a model over every example, on every replica, gathered by example index.

The self-labelling pass (log-probabilities per head), the evaluation passes (features, pooled probe
activations, head predictions) and the kNN search all run a function over batches of
{"index", ...} on each replica of a `tf.distribute` strategy and need the results of all replicas, of
all workers, in example order. `IndexedPass` is that loop, written once.
"""

import logging
import time
from typing import Callable

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
               verbose: int = 0):
    """Returns the outputs of every example, in index order.

    Args:
      dataset: batches of {"index", ...}, every index of [0, num_examples) exactly once.
      num_examples: N.
      description: what the pass is, for the log line and the error messages.
      verbose: 1 shows a progress bar.
    """
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
          flat_outputs = [np.zeros((num_examples,) + value.shape[1:], value.dtype) for value in flat]
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

