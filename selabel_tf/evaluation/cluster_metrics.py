"""How well self-labels (clusters) agree with the true classes, and how balanced they are (paper sec. 4).

`cluster_metrics` returns, for K clusters and C classes:
- "nmi", "adjusted_nmi", "ari": scikit-learn's normalized_mutual_info_score (arithmetic mean),
  adjusted_mutual_info_score and adjusted_rand_score.
- "hungarian_accuracy": the accuracy of the best one-to-one matching of clusters to classes
  (`scipy.optimize.linear_sum_assignment`). With K != C the matching is rectangular: min(K, C) pairs,
  and the examples of unmatched clusters count as wrong.
- "majority_accuracy", only when K > C: each cluster predicts its most frequent class. With more
  clusters than classes a one-to-one matching leaves K - C clusters wrong by construction, so this
  many-to-one score is the informative one there. For K <= C it is left out: the one-to-one score is
  then the standard one, and the many-to-one one would credit two clusters for the same class.
- "size_min", "size_max": the smallest and largest cluster; "size_entropy": the entropy of the
  cluster-size distribution in nats; "size_entropy_normalized": divided by log K, so 1.0 is a perfect
  equipartition (1.0 also when K = 1).

K is `num_clusters` when given (clusters without examples then count: size_min 0), else
max(cluster_labels) + 1; C is max(class_labels) + 1. Both come from the label values, so the set of
keys is the same for every labelling of one dataset with one `num_clusters`.
"""

from typing import Dict, Optional

import numpy as np
from scipy import optimize
from scipy import stats
from sklearn import metrics


def cluster_metrics(cluster_labels, class_labels, *,
                    num_clusters: Optional[int] = None) -> Dict[str, float]:
  """Agreement of clusters with classes, and the balance of the cluster sizes.

  Args:
    cluster_labels: int [N], the cluster of each example, in [0, num_clusters).
    class_labels: int [N], the true class of each example.
    num_clusters: K; default max(cluster_labels) + 1.

  Returns:
    A dict of floats: "nmi", "adjusted_nmi", "ari", "hungarian_accuracy", "majority_accuracy" (only
    when K > C), "size_min", "size_max", "size_entropy", "size_entropy_normalized" (see the module
    docstring).

  Raises:
    ValueError: if the labels are not non-empty 1-D non-negative ints of one length, or a cluster label
      is >= num_clusters.
  """
  cluster_labels, class_labels = _check_labels(cluster_labels, class_labels)
  if num_clusters is None:
    num_clusters = int(cluster_labels.max()) + 1
  elif (isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer))
        or num_clusters < 1):
    raise ValueError(f"num_clusters must be a positive int, got {num_clusters!r}")
  elif cluster_labels.max() >= num_clusters:
    raise ValueError(f"cluster_labels must be < num_clusters={num_clusters}, got maximum "
                     f"{cluster_labels.max()}")
  num_clusters = int(num_clusters)
  num_classes = int(class_labels.max()) + 1
  counts = _contingency(cluster_labels, class_labels, num_clusters, num_classes)

  sizes = counts.sum(axis=1)
  size_entropy = float(stats.entropy(sizes))
  agreement = nmi_ari(cluster_labels, class_labels)
  results = {
      "nmi": agreement["nmi"],
      "adjusted_nmi": float(metrics.adjusted_mutual_info_score(class_labels, cluster_labels)),
      "ari": agreement["ari"],
      "hungarian_accuracy": _hungarian_accuracy(counts),
  }
  if num_clusters > num_classes:
    results["majority_accuracy"] = _majority_vote_accuracy(counts)
  results.update({
      "size_min": float(sizes.min()),
      "size_max": float(sizes.max()),
      "size_entropy": size_entropy,
      "size_entropy_normalized": size_entropy / np.log(num_clusters) if num_clusters > 1 else 1.0,
  })
  return results


def nmi_ari(cluster_labels, class_labels) -> Dict[str, float]:
  """{"nmi", "ari"}: `cluster_metrics`' two cheapest agreement scores alone (e.g. at every labelling).

  Raises:
    ValueError: as `cluster_metrics`.
  """
  cluster_labels, class_labels = _check_labels(cluster_labels, class_labels)
  return {"nmi": float(metrics.normalized_mutual_info_score(class_labels, cluster_labels)),
          "ari": float(metrics.adjusted_rand_score(class_labels, cluster_labels))}


def hungarian_accuracy(cluster_labels, class_labels) -> float:
  """The fraction of examples right under the best one-to-one matching of clusters to classes.

  Args:
    cluster_labels: int [N].
    class_labels: int [N].

  Returns:
    A float in [0, 1]; with K != C, examples in unmatched clusters count as wrong.
  """
  cluster_labels, class_labels = _check_labels(cluster_labels, class_labels)
  return _hungarian_accuracy(_contingency(cluster_labels, class_labels))


def majority_vote_accuracy(cluster_labels, class_labels) -> float:
  """The fraction of examples in their cluster's most frequent class (a many-to-one matching).

  Args:
    cluster_labels: int [N].
    class_labels: int [N].

  Returns:
    A float in [0, 1]; it is 1.0 for one cluster per example, so compare it only at a fixed K.
  """
  cluster_labels, class_labels = _check_labels(cluster_labels, class_labels)
  return _majority_vote_accuracy(_contingency(cluster_labels, class_labels))


def _hungarian_accuracy(counts):
  rows, cols = optimize.linear_sum_assignment(counts, maximize=True)
  return float(counts[rows, cols].sum() / counts.sum())


def _majority_vote_accuracy(counts):
  return float(counts.max(axis=1).sum() / counts.sum())


def _contingency(cluster_labels, class_labels, num_clusters=None, num_classes=None):
  """int64 [K, C]: counts[k, c] = the number of examples of class c in cluster k."""
  num_clusters = num_clusters or int(cluster_labels.max()) + 1
  num_classes = num_classes or int(class_labels.max()) + 1
  flat = np.bincount(cluster_labels * num_classes + class_labels, minlength=num_clusters * num_classes)
  return flat.reshape(num_clusters, num_classes)


def _check_labels(cluster_labels, class_labels):
  """Both as int64 [N], checked: 1-D, non-empty, integer, non-negative, of one length."""
  checked = []
  for name, labels in (("cluster_labels", cluster_labels), ("class_labels", class_labels)):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
      raise ValueError(f"{name} must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{name} must be integers, got dtype {labels.dtype}")
    if labels.min() < 0:
      raise ValueError(f"{name} must be >= 0, got minimum {labels.min()}")
    checked.append(labels.astype(np.int64))
  if checked[0].shape != checked[1].shape:
    raise ValueError(f"cluster_labels and class_labels must have one label per example each, got "
                     f"lengths {checked[0].size} and {checked[1].size}")
  return checked
