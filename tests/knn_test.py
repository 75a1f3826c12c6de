"""Tests for `selabel_tf.evaluation.knn`: the weighted kNN classifier (paper Table 6).

The reference is a plain float64 numpy transcription of the protocol: the full similarity matrix, a
stable argsort, weights exp(sim / T) and votes summed with np.add.at. To compare neighbours and
predictions exactly, most tests use "grid" features: integer vectors of norm 32 divided by 32, so every
feature, norm and dot product is exact in float32 and float64 and the two computations see the same
similarities, ties included (both order equal similarities by training index). Gaussian features check
the similarities against the reference within float32 rounding.
"""

import numpy as np
import pytest
import tensorflow as tf

from selabel_tf.evaluation import knn

NUM_TRAIN, NUM_TEST, NUM_CLASSES, DIM = 500, 61, 7, 8
# Grid features: entries in {-32, ..., 32} / 32 with squares summing to 32^2, i.e. unit norm exactly.
_GRID_SCALE = 32


def _grid_unit_vectors(rng, num_rows, dim=DIM):
  """float32 [num_rows, dim] unit vectors whose entries are multiples of 1/32 (exact dot products)."""
  rows = []
  while sum(len(r) for r in rows) < num_rows:
    direction = rng.normal(size=(4096, dim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    head = np.round(direction[:, :-1] * (_GRID_SCALE - 1))
    remainder = _GRID_SCALE**2 - np.sum(head**2, axis=1)
    last = np.round(np.sqrt(np.maximum(remainder, 0)))
    exact = (remainder >= 0) & (last**2 == remainder)
    sign = np.where(rng.random(4096) < 0.5, -1.0, 1.0)
    rows.append(np.concatenate([head, (sign * last)[:, None]], axis=1)[exact])
  vectors = np.concatenate(rows)[:num_rows]
  vectors = vectors[:, rng.permutation(dim)]  # The computed coordinate in every position.
  assert np.all(np.sum(vectors**2, axis=1) == _GRID_SCALE**2)
  return (vectors / _GRID_SCALE).astype(np.float32)


def _grid_data(seed):
  rng = np.random.default_rng(seed)
  return (_grid_unit_vectors(rng, NUM_TRAIN), rng.integers(0, NUM_CLASSES, NUM_TRAIN),
          _grid_unit_vectors(rng, NUM_TEST))


def _reference_knn(train_features, train_labels, test_features, ks, temperature, num_classes):
  """(predictions {k: [M]}, similarities [M, max_k], neighbours [M, max_k]) in float64 numpy."""
  train = train_features.astype(np.float64)
  test = test_features.astype(np.float64)
  train /= np.linalg.norm(train, axis=1, keepdims=True)
  test /= np.linalg.norm(test, axis=1, keepdims=True)
  similarity = test @ train.T
  neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :max(ks)]
  top = np.take_along_axis(similarity, neighbours, axis=1)
  predictions = {}
  for k in ks:
    votes = np.zeros((test.shape[0], num_classes))
    rows = np.repeat(np.arange(test.shape[0])[:, None], k, axis=1)
    np.add.at(votes, (rows, train_labels[neighbours[:, :k]]), np.exp(top[:, :k] / temperature))
    predictions[k] = np.argmax(votes, axis=1)
  return predictions, top, neighbours


def _assert_matches_reference(result, reference, ks):
  predictions, similarities, neighbours = reference
  assert sorted(result.predictions) == sorted(ks)
  for k in ks:
    assert result.predictions[k].dtype == np.int64 and result.predictions[k].shape == (NUM_TEST,)
    np.testing.assert_array_equal(result.predictions[k], predictions[k], err_msg=f"k={k}")
  assert result.neighbours.dtype == np.int64 and result.similarities.dtype == np.float32
  np.testing.assert_array_equal(result.neighbours, neighbours)
  np.testing.assert_allclose(result.similarities, similarities, rtol=0, atol=1e-5)


@pytest.mark.parametrize("train_chunk_size, ks, temperature", [
    (65536, (10,), 0.1),            # One chunk: the whole training set.
    (37, (10,), 0.1),               # Many chunks, the last one of 19 rows.
    (37, (1, 5, 50, 200), 0.1),     # k larger than a chunk, several ks at once.
    (499, (3, 20), 0.5),            # A last chunk of one row, smaller than every k.
])
def test_matches_numpy_reference(train_chunk_size, ks, temperature):
  train, labels, test = _grid_data(seed=0)
  result = knn.weighted_knn(train, labels, test, ks=ks, temperature=temperature,
                            train_chunk_size=train_chunk_size, test_batch_size=16)
  _assert_matches_reference(result, _reference_knn(train, labels, test, ks, temperature, NUM_CLASSES),
                            ks)


def test_gaussian_features_match_reference_similarities():
  rng = np.random.default_rng(1)
  train = rng.normal(size=(NUM_TRAIN, 16)).astype(np.float32) * 3.0
  test = rng.normal(size=(NUM_TEST, 16)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, NUM_TRAIN)
  result = knn.weighted_knn(train, labels, test, ks=(50,), train_chunk_size=64)
  _, similarities, _ = _reference_knn(train, labels, test, (50,), 0.1, NUM_CLASSES)
  # Sorted similarities do not depend on how float32 rounding orders near-ties.
  np.testing.assert_allclose(result.similarities, similarities, rtol=0, atol=1e-5)
  train_unit = train / np.linalg.norm(train.astype(np.float64), axis=1, keepdims=True)
  test_unit = test / np.linalg.norm(test.astype(np.float64), axis=1, keepdims=True)
  of_neighbours = np.einsum("md,mkd->mk", test_unit, train_unit[result.neighbours])
  np.testing.assert_allclose(result.similarities, of_neighbours, rtol=0, atol=1e-5)


def test_two_replicas_match_one_replica(mirrored_strategy):
  train, labels, test = _grid_data(seed=2)
  assert NUM_TEST % 16 == 13  # The last global batch of 13 rows splits unevenly over 2 replicas.
  options = dict(ks=(1, 10, 50), train_chunk_size=37, test_batch_size=16)
  one = knn.weighted_knn(train, labels, test, strategy=tf.distribute.OneDeviceStrategy("/cpu:0"),
                         **options)
  two = knn.weighted_knn(train, labels, test, strategy=mirrored_strategy, **options)
  for k in options["ks"]:
    np.testing.assert_array_equal(two.predictions[k], one.predictions[k], err_msg=f"k={k}")
  np.testing.assert_array_equal(two.neighbours, one.neighbours)
  np.testing.assert_allclose(two.similarities, one.similarities, rtol=0, atol=1e-5)
  _assert_matches_reference(two, _reference_knn(train, labels, test, options["ks"], 0.1, NUM_CLASSES),
                            options["ks"])


def test_two_replicas_with_an_empty_replica(mirrored_strategy):
  train, labels, test = _grid_data(seed=3)
  test = test[:17]  # The last global batch holds 1 row: the second replica gets none.
  result = knn.weighted_knn(train, labels, test, ks=(5,), test_batch_size=16,
                            strategy=mirrored_strategy)
  predictions, similarities, neighbours = _reference_knn(train, labels, test, (5,), 0.1, NUM_CLASSES)
  np.testing.assert_array_equal(result.predictions[5], predictions[5])
  np.testing.assert_array_equal(result.neighbours, neighbours)
  np.testing.assert_allclose(result.similarities, similarities, rtol=0, atol=1e-5)


def test_accuracy_counts_correct_predictions():
  result = knn.KNNResult(predictions={1: np.array([0, 1, 2, 3]), 5: np.array([0, 0, 0, 0])},
                         similarities=np.zeros((4, 5), np.float32),
                         neighbours=np.zeros((4, 5), np.int64))
  assert result.accuracy([0, 1, 2, 0]) == {1: 0.75, 5: 0.5}
  with pytest.raises(ValueError, match=r"test_labels must have shape \(4,\).*\(3,\)"):
    result.accuracy([0, 1, 2])


def test_separated_classes_are_classified_correctly():
  rng = np.random.default_rng(4)
  centres = rng.normal(size=(NUM_CLASSES, 32))
  train_labels = np.arange(NUM_TRAIN) % NUM_CLASSES
  test_labels = rng.integers(0, NUM_CLASSES, NUM_TEST)
  train = centres[train_labels] + 0.05 * rng.normal(size=(NUM_TRAIN, 32))
  test = centres[test_labels] + 0.05 * rng.normal(size=(NUM_TEST, 32))
  result = knn.weighted_knn(train, train_labels, test, ks=(1, 20))
  assert result.accuracy(test_labels) == {1: 1.0, 20: 1.0}


@pytest.mark.parametrize("change, match", [
    (dict(ks=(10, 501)), r"ks must be at most the number of training examples N=500, got k=501"),
    (dict(ks=(0,)), r"ks must hold positive ints, got 0"),
    (dict(ks=()), r"ks must be a non-empty sequence"),
    (dict(ks=10), r"ks must be a non-empty sequence"),
    (dict(test_features=np.ones((3, DIM + 1))), r"test_features must have the feature dimension .*8"),
    (dict(train_labels=np.zeros(499, np.int64)), r"train_labels must have shape \(500,\).*\(499,\)"),
    (dict(train_labels=np.full(500, -1)), r"train_labels must be >= 0"),
    (dict(num_classes=3), r"train_labels must be < num_classes=3"),
    (dict(temperature=0.0), r"temperature must be a finite number > 0, got 0.0"),
    (dict(train_chunk_size=0), r"train_chunk_size must be a positive int, got 0"),
    (dict(test_features=np.full((2, DIM), np.nan)), r"test_features must be finite"),
])
def test_invalid_arguments_are_named(change, match):
  train, labels, test = _grid_data(seed=5)
  arguments = dict(train_features=train, train_labels=labels, test_features=test, ks=(10,))
  arguments.update(change)
  with pytest.raises(ValueError, match=match):
    knn.weighted_knn(arguments.pop("train_features"), arguments.pop("train_labels"),
                     arguments.pop("test_features"), **arguments)
