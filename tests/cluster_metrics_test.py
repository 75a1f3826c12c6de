"""Tests for `selabel_tf.evaluation.cluster_metrics`.

Each score is compared with an independent computation: scikit-learn's scores and contingency matrix,
scipy's entropy, a brute force over all one-to-one matchings, and a per-cluster numpy loop.
"""

import itertools
import math

import numpy as np
import pytest
from scipy import optimize
from scipy import stats
from sklearn import metrics

from selabel_tf.evaluation import cluster_metrics as cm


def _random_labels(seed, num_examples, num_clusters, num_classes):
  rng = np.random.default_rng(seed)
  classes = rng.integers(0, num_classes, num_examples)
  # Clusters that agree with the classes in part, so that the scores are not all near 0.
  clusters = np.where(rng.random(num_examples) < 0.6, classes % num_clusters,
                      rng.integers(0, num_clusters, num_examples))
  return clusters, classes


def _brute_force_hungarian(clusters, classes):
  """The best one-to-one matching by trying every injective map from the smaller side."""
  counts = np.zeros((clusters.max() + 1, classes.max() + 1), np.int64)
  np.add.at(counts, (clusters, classes), 1)
  num_clusters, num_classes = counts.shape
  if num_clusters <= num_classes:
    best = max(sum(counts[k, c] for k, c in enumerate(image))
               for image in itertools.permutations(range(num_classes), num_clusters))
  else:
    best = max(sum(counts[k, c] for c, k in enumerate(image))
               for image in itertools.permutations(range(num_clusters), num_classes))
  return best / clusters.size


def _numpy_majority(clusters, classes):
  correct = 0
  for cluster in np.unique(clusters):
    members = classes[clusters == cluster]
    correct += np.sum(members == np.bincount(members).argmax())
  return correct / clusters.size


@pytest.mark.parametrize("num_clusters, num_classes", [(5, 5), (3, 7), (12, 4)])
def test_every_metric_equals_sklearn_and_scipy(num_clusters, num_classes):
  clusters, classes = _random_labels(0, 1000, num_clusters, num_classes)
  results = cm.cluster_metrics(clusters, classes, num_clusters=num_clusters)
  assert results["nmi"] == pytest.approx(metrics.normalized_mutual_info_score(classes, clusters),
                                         abs=1e-12)
  assert results["adjusted_nmi"] == pytest.approx(metrics.adjusted_mutual_info_score(classes, clusters),
                                                  abs=1e-12)
  assert results["ari"] == pytest.approx(metrics.adjusted_rand_score(classes, clusters), abs=1e-12)
  counts = metrics.cluster.contingency_matrix(clusters, classes)
  rows, cols = optimize.linear_sum_assignment(-counts)
  assert results["hungarian_accuracy"] == pytest.approx(counts[rows, cols].sum() / 1000, abs=1e-12)
  sizes = np.bincount(clusters, minlength=num_clusters)
  assert results["size_min"] == sizes.min() and results["size_max"] == sizes.max()
  assert results["size_entropy"] == pytest.approx(stats.entropy(sizes), abs=1e-12)
  assert results["size_entropy_normalized"] == pytest.approx(stats.entropy(sizes) / np.log(num_clusters),
                                                             abs=1e-12)
  assert ("majority_accuracy" in results) == (num_clusters > num_classes)
  if num_clusters > num_classes:
    assert results["majority_accuracy"] == pytest.approx(_numpy_majority(clusters, classes), abs=1e-12)
  assert all(isinstance(value, float) for value in results.values())


@pytest.mark.parametrize("num_clusters, num_classes", [(3, 5), (4, 4), (5, 3), (1, 4), (4, 1), (6, 6)])
def test_hungarian_accuracy_equals_brute_force(num_clusters, num_classes):
  for seed in range(3):
    clusters, classes = _random_labels(seed, 60, num_clusters, num_classes)
    clusters[:num_clusters], classes[:num_classes] = np.arange(num_clusters), np.arange(num_classes)
    expected = _brute_force_hungarian(clusters, classes)
    assert cm.hungarian_accuracy(clusters, classes) == pytest.approx(expected, abs=1e-12)
    assert cm.cluster_metrics(clusters, classes)["hungarian_accuracy"] == pytest.approx(expected,
                                                                                         abs=1e-12)


@pytest.mark.parametrize("num_clusters, num_classes", [(3, 5), (5, 5), (10, 3)])
def test_majority_vote_equals_numpy_reference(num_clusters, num_classes):
  clusters, classes = _random_labels(1, 500, num_clusters, num_classes)
  assert cm.majority_vote_accuracy(clusters, classes) == pytest.approx(
      _numpy_majority(clusters, classes), abs=1e-12)
  assert cm.majority_vote_accuracy(clusters, classes) >= cm.hungarian_accuracy(clusters, classes)


def test_sizes_count_empty_clusters():
  clusters = np.array([0, 0, 0, 1, 1, 3, 3, 3, 3, 3])  # Clusters 2, 4, 5 are empty.
  classes = np.zeros(10, np.int64)
  results = cm.cluster_metrics(clusters, classes, num_clusters=6)
  assert results["size_min"] == 0.0 and results["size_max"] == 5.0
  fractions = np.array([0.3, 0.2, 0.5])
  assert results["size_entropy"] == pytest.approx(-np.sum(fractions * np.log(fractions)), abs=1e-12)
  assert results["size_entropy_normalized"] == pytest.approx(results["size_entropy"] / math.log(6),
                                                             abs=1e-12)
  assert cm.cluster_metrics(clusters, classes)["size_min"] == 0.0  # Cluster 2 is empty in K = 4 too.


def test_perfect_clustering_under_a_permutation_scores_one():
  classes = np.repeat(np.arange(6), 20)
  clusters = np.array([4, 0, 5, 2, 1, 3])[classes]
  results = cm.cluster_metrics(clusters, classes)
  for name in ("nmi", "adjusted_nmi", "ari", "hungarian_accuracy", "size_entropy_normalized"):
    assert results[name] == pytest.approx(1.0, abs=1e-12), name
  assert "majority_accuracy" not in results
  assert results["size_min"] == results["size_max"] == 20.0


def test_each_class_split_in_two_clusters():
  classes = np.repeat(np.arange(3), 20)
  clusters = 2 * classes + np.tile([0, 1], 30)
  results = cm.cluster_metrics(clusters, classes)
  assert results["majority_accuracy"] == 1.0
  assert results["hungarian_accuracy"] == pytest.approx(0.5)
  assert results["size_entropy_normalized"] == pytest.approx(1.0)


def test_one_cluster_is_balanced():
  results = cm.cluster_metrics(np.zeros(5, np.int64), np.arange(5))
  assert results["size_entropy"] == 0.0 and results["size_entropy_normalized"] == 1.0
  assert results["hungarian_accuracy"] == pytest.approx(0.2)


@pytest.mark.parametrize("clusters, classes, options, match", [
    ([0, 1, 2], [0, 1], {}, r"lengths 3 and 2"),
    ([], [], {}, r"cluster_labels must be a non-empty 1-D array, got shape \(0,\)"),
    ([[0, 1]], [[0, 1]], {}, r"cluster_labels must be a non-empty 1-D array, got shape \(1, 2\)"),
    ([0, -1], [0, 1], {}, r"cluster_labels must be >= 0, got minimum -1"),
    ([0, 1], [0.0, 1.0], {}, r"class_labels must be integers, got dtype float64"),
    ([0, 3], [0, 1], dict(num_clusters=3), r"cluster_labels must be < num_clusters=3, got maximum 3"),
    ([0, 1], [0, 1], dict(num_clusters=0), r"num_clusters must be a positive int, got 0"),
])
def test_invalid_labels_are_named(clusters, classes, options, match):
  with pytest.raises(ValueError, match=match):
    cm.cluster_metrics(np.array(clusters), np.array(classes), **options)


def test_accuracy_functions_check_labels():
  with pytest.raises(ValueError, match=r"lengths 2 and 3"):
    cm.hungarian_accuracy([0, 1], [0, 1, 2])
  with pytest.raises(ValueError, match=r"class_labels must be >= 0"):
    cm.majority_vote_accuracy([0, 1], [0, -2])
