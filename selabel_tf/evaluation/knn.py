"""Weighted k-nearest-neighbour classification of features (the InstDisc/AND protocol, paper Table 6).

Features are L2-normalised, so the similarity of two examples is their cosine. Each of the k training
examples most similar to a test example votes for its class with weight exp(similarity / temperature);
the prediction is the class with the largest summed vote. One search gives the top max(ks) neighbours,
from which every k of `ks` is read.

The search runs in TensorFlow and its memory is bounded whatever the size of the training set: the
training set is read in chunks of `train_chunk_size` rows, so no [num_test, N] matrix is ever built, only
[test batch, chunk] similarities; each test example keeps a running top-max_k, merged with each chunk's
top-k (concatenate, then `tf.math.top_k`). Ties in similarity go to the lower training index, as in a
stable sort.

Under a `tf.distribute.Strategy` every replica holds a copy of the (normalised) training and test
features on its own device, and the batches of test indices are split over the replicas; the results of
all replicas, of all workers, are gathered with `strategy.gather` and put back in place by index. The
chunk loop has data-dependent shapes (the last chunk, the last batch): it targets CPU and GPU replicas,
not XLA-compiled TPU steps.
"""

import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

# A zero feature vector stays zero after normalisation (similarity 0 to everything) instead of NaN.
_MIN_NORM = 1e-12


@dataclasses.dataclass(frozen=True)
class KNNResult:
  """The neighbours of each test example and the weighted-vote prediction for each k.

  Attributes:
    predictions: k -> int64 [num_test], the predicted class of each test example.
    similarities: float32 [num_test, max_k], cosine similarity of each test example to its neighbours,
      in descending order.
    neighbours: int64 [num_test, max_k], indices into the training set, most similar first.
  """
  predictions: Dict[int, np.ndarray]
  similarities: np.ndarray
  neighbours: np.ndarray

  def accuracy(self, test_labels) -> Dict[int, float]:
    """Top-1 accuracy for each k.

    Args:
      test_labels: int [num_test], the true classes.

    Returns:
      k -> the fraction of test examples whose prediction equals their label, in [0, 1].
    """
    test_labels = np.asarray(test_labels)
    num_test = self.similarities.shape[0]
    if test_labels.shape != (num_test,):
      raise ValueError(f"test_labels must have shape ({num_test},) (one label per test example), got "
                       f"{test_labels.shape}")
    return {k: float(np.mean(predictions == test_labels)) for k, predictions in self.predictions.items()}


def weighted_knn(train_features,
                 train_labels,
                 test_features,
                 *,
                 num_classes: Optional[int] = None,
                 ks: Sequence[int] = (10, 50, 200),
                 temperature: float = 0.1,
                 train_chunk_size: int = 65536,
                 test_batch_size: int = 1024,
                 strategy: Optional[tf.distribute.Strategy] = None) -> KNNResult:
  """Classifies test features by a similarity-weighted vote of their nearest training features.

  Args:
    train_features: float [N, D], features of the training set (need not be normalised).
    train_labels: int [N], classes of the training set, in [0, num_classes).
    test_features: float [num_test, D], features to classify.
    num_classes: C; default max(train_labels) + 1.
    ks: the numbers of neighbours to report predictions for, each in [1, N].
    temperature: the vote weight of a neighbour is exp(similarity / temperature).
    train_chunk_size: training rows compared with a test batch at once; bounds the similarity matrix
      of a replica at [test_batch_size / replicas, train_chunk_size]. A chunk smaller than max(ks)
      contributes all its rows as candidates.
    test_batch_size: test rows per global batch, split over the replicas of `strategy`.
    strategy: the `tf.distribute.Strategy` whose replicas run the search; default: the current one
      (`tf.distribute.get_strategy()`). Call this in cross-replica context.

  Returns:
    A `KNNResult` with the predictions for every k of `ks` and the top max(ks) neighbours.

  Raises:
    ValueError: if an argument has the wrong shape, type or range (the message names it).
  """
  train_features = _as_features("train_features", train_features)
  test_features = _as_features("test_features", test_features)
  num_train, dim = train_features.shape
  if test_features.shape[1] != dim:
    raise ValueError(f"test_features must have the feature dimension of train_features ({dim}), got "
                     f"shape {test_features.shape}")
  train_labels, num_classes = _as_labels(train_labels, num_train, num_classes)
  ks = _as_ks(ks, num_train)
  _check_positive_int("train_chunk_size", train_chunk_size)
  _check_positive_int("test_batch_size", test_batch_size)
  if isinstance(temperature, bool) or not np.isfinite(temperature) or temperature <= 0:
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
  if strategy is None:
    strategy = tf.distribute.get_strategy()

  max_k = max(ks)
  chunk_size = min(train_chunk_size, num_train)
  with tf.device("/cpu:0"):  # Not on the first accelerator: that would hold the features twice.
    host_values = (tf.constant(train_features), tf.constant(train_labels), tf.constant(test_features))

  @tf.function
  def copy_to_replicas():
    # Eager host tensors, captured: a graph constant of the features could exceed the 2 GB proto limit.
    return strategy.run(lambda: (_l2_normalize(host_values[0]), tf.identity(host_values[1]),
                                 _l2_normalize(host_values[2])))

  # One copy per replica device, made once: the chunks are then read on the device at every batch.
  on_replicas = copy_to_replicas()

  def replica_step(index, train, labels, test):
    similarities, neighbours = _top_neighbours(tf.gather(test, index), train, max_k, chunk_size)
    predictions = [_vote(similarities[:, :k], tf.gather(labels, neighbours[:, :k]), temperature,
                         num_classes) for k in ks]
    return {"index": index, "similarities": similarities, "neighbours": tf.cast(neighbours, tf.int64),
            "predictions": tf.stack(predictions, axis=1)}

  num_test = test_features.shape[0]
  indices = tf.data.Dataset.range(num_test).batch(test_batch_size)
  options = tf.data.Options()
  # Range has no files to shard by; with several workers each takes its share of the batches.
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
  index_batches = strategy.experimental_distribute_dataset(indices.with_options(options))

  # The signature of a batch of any size: the last, smaller batch does not trace the step again.
  @tf.function(input_signature=[index_batches.element_spec])
  def step(index):
    return _gather(strategy, strategy.run(replica_step, args=(index,) + tuple(on_replicas)))

  similarities = np.zeros((num_test, max_k), np.float32)
  neighbours = np.zeros((num_test, max_k), np.int64)
  predictions = np.zeros((num_test, len(ks)), np.int64)
  seen = np.zeros(num_test, np.int64)
  for index_batch in index_batches:
    batch = {name: value.numpy() for name, value in step(index_batch).items()}
    index = batch["index"]
    similarities[index] = batch["similarities"]
    neighbours[index] = batch["neighbours"]
    predictions[index] = batch["predictions"]
    np.add.at(seen, index, 1)
  if not np.all(seen == 1):
    raise RuntimeError(f"weighted_knn: the distributed pass covered {int(np.sum(seen > 0))} of "
                       f"{num_test} test examples ({int(np.sum(seen > 1))} more than once)")
  return KNNResult(predictions={k: predictions[:, i] for i, k in enumerate(ks)},
                   similarities=similarities, neighbours=neighbours)


def _top_neighbours(queries, train, max_k, chunk_size):
  """The max_k training rows most similar to each query, merging chunk by chunk.

  Args:
    queries: float32 [B, D], L2-normalised.
    train: float32 [N, D], L2-normalised; N >= max_k.
    max_k: neighbours kept per query.
    chunk_size: training rows per chunk, <= N.

  Returns:
    (similarities float32 [B, max_k] descending, neighbours int32 [B, max_k]); equal similarities are
    ordered by training index.
  """
  num_train = train.shape[0]
  num_queries = tf.shape(queries)[0]
  num_chunks = -(-num_train // chunk_size)
  candidates_per_chunk = min(max_k, chunk_size)

  def merge_chunk(chunk_index, best_similarities, best_neighbours):
    start = chunk_index * chunk_size
    size = tf.minimum(chunk_size, num_train - start)
    chunk_similarities = tf.matmul(queries, tf.slice(train, [start, 0], [size, -1]), transpose_b=True)
    chunk_top = tf.math.top_k(chunk_similarities, k=tf.minimum(candidates_per_chunk, size))
    # The running best come first and have the lower indices: top_k keeps the first of equal values.
    merged_similarities = tf.concat([best_similarities, chunk_top.values], axis=1)
    merged_neighbours = tf.concat([best_neighbours, chunk_top.indices + start], axis=1)
    top = tf.math.top_k(merged_similarities, k=max_k)
    return (chunk_index + 1, top.values,
            tf.gather(merged_neighbours, top.indices, batch_dims=1))

  # The -inf placeholders lose to every real similarity, and N >= max_k real ones arrive.
  initial = (tf.constant(0), tf.fill([num_queries, max_k], tf.constant(-np.inf, tf.float32)),
             tf.fill([num_queries, max_k], -1))
  # One chunk at a time (parallel_iterations=1): that is what bounds the memory.
  _, similarities, neighbours = tf.while_loop(lambda chunk_index, *_: chunk_index < num_chunks,
                                              merge_chunk, initial, parallel_iterations=1)
  return similarities, neighbours


def _vote(similarities, neighbour_labels, temperature, num_classes):
  """int64 [B]: the class of largest summed weight exp(similarity / temperature) over the neighbours.

  Args:
    similarities: float32 [B, k].
    neighbour_labels: int32 [B, k], classes of the neighbours.
    temperature: float > 0.
    num_classes: C.
  """
  num_queries = tf.shape(similarities)[0]
  weights = tf.exp(similarities / temperature)
  vote_slot = tf.range(num_queries)[:, None] * num_classes + neighbour_labels
  votes = tf.math.unsorted_segment_sum(weights, vote_slot, num_queries * num_classes)
  return tf.argmax(tf.reshape(votes, [num_queries, num_classes]), axis=1, output_type=tf.int64)


def _l2_normalize(features):
  """float32 [N, D] rows of unit norm (zero rows stay zero). A division, not rsqrt: unit rows stay
  bit-identical."""
  norms = tf.norm(features, axis=1, keepdims=True)
  return features / tf.maximum(norms, _MIN_NORM)


def _gather(strategy, per_replica):
  """The outputs of every replica, on every worker, rows concatenated in replica order."""
  if strategy.num_replicas_in_sync == 1:
    return strategy.experimental_local_results(per_replica)[0]
  # Leaf by leaf: strategy.gather of a structure would return the first replica's alone.
  return tf.nest.map_structure(lambda value: strategy.gather(value, axis=0), per_replica)


def _as_features(name, features):
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
    raise ValueError(f"{name} must be a non-empty float array [num_examples, D], got shape "
                     f"{features.shape}")
  if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
    raise ValueError(f"{name} must hold numbers, got dtype {features.dtype}")
  features = features.astype(np.float32, copy=False)
  if not np.all(np.isfinite(features)):
    raise ValueError(f"{name} must be finite; it holds {int(np.sum(~np.isfinite(features)))} NaN or "
                     f"infinite values")
  return features


def _as_labels(train_labels, num_train, num_classes):
  """(int32 [N] labels, C), checked against the training set and num_classes."""
  train_labels = np.asarray(train_labels)
  if train_labels.shape != (num_train,):
    raise ValueError(f"train_labels must have shape ({num_train},) (one per row of train_features), "
                     f"got {train_labels.shape}")
  if not np.issubdtype(train_labels.dtype, np.integer):
    raise ValueError(f"train_labels must be integers, got dtype {train_labels.dtype}")
  if train_labels.min() < 0:
    raise ValueError(f"train_labels must be >= 0, got minimum {train_labels.min()}")
  if num_classes is None:
    num_classes = int(train_labels.max()) + 1
  else:
    _check_positive_int("num_classes", num_classes)
    if train_labels.max() >= num_classes:
      raise ValueError(f"train_labels must be < num_classes={num_classes}, got maximum "
                       f"{train_labels.max()}")
  return train_labels.astype(np.int32), int(num_classes)


def _as_ks(ks, num_train):
  """Sorted distinct ks, each a positive int <= N."""
  if isinstance(ks, (int, np.integer)) or len(ks) == 0:
    raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
  for k in ks:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"ks must hold positive ints, got {k!r} in ks={tuple(ks)!r}")
    if k > num_train:
      raise ValueError(f"ks must be at most the number of training examples N={num_train}, got "
                       f"k={k}")
  return sorted({int(k) for k in ks})


def _check_positive_int(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
