"""Tests for `selabel_tf.kmeans`: DeepCluster-style K-means pseudo-labels (the paper's Table 8 baseline).

The preprocessing is checked against float64 numpy and scikit-learn PCA, the clustering against faiss'
own `faiss.Kmeans` run on the same preprocessed rows, and the labels against known blobs.
"""

import logging

import faiss
import numpy as np
import pytest
from sklearn import decomposition
from sklearn import metrics

from selabel_tf import kmeans


def _blobs(seed, num_examples=600, dim=64, num_blobs=6, separation=10.0):
  """float32 [N, D] well-separated Gaussian blobs (unit noise) and int [N] blob ids."""
  rng = np.random.default_rng(seed)
  centres = separation * rng.normal(size=(num_blobs, dim))
  blob_ids = np.arange(num_examples) % num_blobs
  return (centres[blob_ids] + rng.normal(size=(num_examples, dim))).astype(np.float32), blob_ids


def _anisotropic(seed, num_examples=2000, dim=12, offset=0.0, scales=None):
  """float64 [N, D] Gaussian rows with distinct variances along random orthogonal directions.

  The standard deviations along them are `scales` (default: evenly spaced from 4 to 0.5).
  """
  rng = np.random.default_rng(seed)
  rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  scales = np.linspace(4.0, 0.5, dim) if scales is None else np.asarray(scales)
  return offset + (rng.normal(size=(num_examples, dim)) * scales) @ rotation.T + rng.normal(size=dim)


def _numpy_pca(features, num_components, whiten):
  """float64 [N, num_components] projection on the leading covariance eigenvectors (signs arbitrary)."""
  centred = features - features.mean(axis=0)
  eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / features.shape[0])
  order = np.argsort(eigenvalues)[::-1][:num_components]
  projected = centred @ eigenvectors[:, order]
  return projected / np.sqrt(eigenvalues[order]) if whiten else projected


def _match_signs(actual, expected):
  """`expected` with each column's sign flipped to agree with `actual`'s."""
  return expected * np.sign(np.sum(actual * expected, axis=0))


def _l2_normalise(rows):
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# preprocess_features.


def test_preprocessed_rows_have_unit_norm_and_pca_dim_clamps_to_d():
  features = _anisotropic(0, dim=12).astype(np.float32)
  preprocessed = kmeans.preprocess_features(features)  # pca_dim=256 > D=12
  assert preprocessed.shape == (2000, 12) and preprocessed.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(preprocessed, axis=1), 1.0, rtol=1e-5)
  assert kmeans.preprocess_features(features, pca_dim=5).shape == (2000, 5)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_whitening_gives_unit_uncorrelated_variances_and_matches_numpy_float64(offset):
  # offset=1000 is a mean far larger than the spread, where a float32 covariance formed as
  # X^T X - n mean mean^T (faiss' PCAMatrix) loses the small eigenvalues to cancellation.
  features = _anisotropic(1, offset=offset)
  projected = kmeans._pca_project(features.astype(np.float32), pca_dim=8, whiten=True,
                                  pca_sample_size=None, seed=0).astype(np.float64)
  np.testing.assert_allclose(np.cov(projected, rowvar=False, bias=True), np.eye(8), atol=2e-3)
  expected = _numpy_pca(features, 8, whiten=True)
  np.testing.assert_allclose(projected, _match_signs(projected, expected), atol=2e-3)


def test_whitened_pca_is_deepclusters_faiss_pca_matrix_on_centred_rows():
  features = _anisotropic(6, dim=16).astype(np.float32)
  features -= features.mean(axis=0)  # faiss' float32 covariance is accurate for centred rows
  faiss_pca = faiss.PCAMatrix(16, 10, -0.5)  # DeepCluster's preprocess_features
  faiss_pca.train(features)
  # faiss' eigenvalues are sums over rows, not means: its components have variance 1/N.
  expected = faiss_pca.apply(features) * np.sqrt(features.shape[0])
  projected = kmeans._pca_project(features, pca_dim=10, whiten=True, pca_sample_size=None, seed=0)
  np.testing.assert_allclose(projected, _match_signs(projected, expected), atol=1e-3)


def test_plain_pca_matches_numpy_float64():
  features = _anisotropic(2)
  projected = kmeans._pca_project(features.astype(np.float32), pca_dim=6, whiten=False,
                                  pca_sample_size=None, seed=0)
  expected = _numpy_pca(features, 6, whiten=False)
  np.testing.assert_allclose(projected, _match_signs(projected, expected), atol=1e-3)


def test_preprocess_matches_sklearn_whitened_pca_then_l2():
  features = _anisotropic(3, dim=20)
  preprocessed = kmeans.preprocess_features(features.astype(np.float32), pca_dim=10)
  expected = _l2_normalise(decomposition.PCA(10, whiten=True, svd_solver="full").fit_transform(features))
  np.testing.assert_allclose(preprocessed, _match_signs(preprocessed, expected), atol=1e-4)


def test_float16_float64_and_array_like_inputs_read_as_float32():
  features = _anisotropic(4).astype(np.float16)
  reference = kmeans.preprocess_features(features.astype(np.float32), pca_dim=6)

  class RowsOnDemand:  # shape, dtype and row indexing only, like a generator of rows or a memmap
    shape, dtype = features.shape, features.dtype

    def __getitem__(self, rows):
      return features[rows]

  np.testing.assert_array_equal(kmeans.preprocess_features(features, pca_dim=6), reference)
  np.testing.assert_array_equal(kmeans.preprocess_features(features.astype(np.float64), pca_dim=6),
                                reference)
  for pca_sample_size in (None, 700):
    np.testing.assert_array_equal(
        kmeans.preprocess_features(RowsOnDemand(), pca_dim=6, pca_sample_size=pca_sample_size),
        kmeans.preprocess_features(features, pca_dim=6, pca_sample_size=pca_sample_size))


def test_pca_sample_is_seeded_and_close_to_the_full_pca():
  # Well-separated variances, so that the leading directions are stable under sampling.
  features = _anisotropic(5, num_examples=4000, dim=8, offset=50.0,
                          scales=(8.0, 4.0, 2.0, 1.0, 0.3, 0.2, 0.1, 0.05)).astype(np.float32)
  full = kmeans.preprocess_features(features, pca_dim=4)
  sampled = kmeans.preprocess_features(features, pca_dim=4, pca_sample_size=1500, seed=7)
  np.testing.assert_array_equal(sampled,
                                kmeans.preprocess_features(features, pca_dim=4, pca_sample_size=1500,
                                                           seed=7))
  assert not np.array_equal(sampled, kmeans.preprocess_features(features, pca_dim=4,
                                                                pca_sample_size=1500, seed=8))
  # A PCA from 1500 rows estimates each whitening scale to a few percent.
  assert np.abs(sampled - _match_signs(sampled, full)).mean() < 0.03
  np.testing.assert_array_equal(kmeans.preprocess_features(features, pca_dim=4, pca_sample_size=4000),
                                full)  # a sample of all rows is all rows


# --------------------------------------------------------------------------------------------------
# assign_labels_kmeans.


def test_separable_blobs_are_recovered_exactly():
  features, blob_ids = _blobs(0)
  # Whitening scales each kept component to unit variance, the 58 noise directions too, so keep few;
  # and faiss initialises from random rows (as DeepCluster), which may put two centroids in one blob:
  # seed 0 is one where it does not.
  assignment = kmeans.assign_labels_kmeans(features, (6,), pca_dim=16, seed=0)
  assert assignment.labels.shape == (1, 600) and assignment.labels.dtype == np.int64
  assert assignment.inertia.shape == (1,) and assignment.inertia.dtype == np.float64
  assert assignment.seconds > 0
  sizes = np.bincount(assignment.labels[0], minlength=6)
  assert sizes.shape == (6,) and np.all(sizes > 0)
  assert metrics.normalized_mutual_info_score(blob_ids, assignment.labels[0]) == pytest.approx(1.0)


def test_labels_are_faiss_kmeans_on_the_preprocessed_features():
  features, _ = _blobs(1, num_blobs=10)
  assignment = kmeans.assign_labels_kmeans(features, (6, 6, 9), pca_dim=16, num_iterations=12, seed=3)
  preprocessed = kmeans.preprocess_features(features, pca_dim=16, seed=3)
  for head, num_clusters in enumerate((6, 6, 9)):
    reference = faiss.Kmeans(16, num_clusters, niter=12, seed=3 + head)
    reference.train(preprocessed)
    squared_distances, labels = reference.index.search(preprocessed, 1)
    np.testing.assert_array_equal(assignment.labels[head], labels[:, 0])
    assert assignment.inertia[head] == pytest.approx(squared_distances.sum(dtype=np.float64), rel=1e-6)


def test_heads_of_equal_k_differ_and_heads_of_different_k_have_k_clusters():
  features = np.random.default_rng(2).normal(size=(600, 24)).astype(np.float32)  # no clusters to find
  assignment = kmeans.assign_labels_kmeans(features, (8, 8, 3, 17), pca_dim=24)
  assert metrics.normalized_mutual_info_score(assignment.labels[0], assignment.labels[1]) < 0.9
  for head, num_clusters in enumerate((8, 8, 3, 17)):
    sizes = np.bincount(assignment.labels[head])
    assert sizes.shape == (num_clusters,) and np.all(sizes > 0)
    assert assignment.labels[head].min() == 0


def test_same_seed_gives_the_same_labels():
  features, _ = _blobs(3)
  first = kmeans.assign_labels_kmeans(features, (6, 4), pca_dim=8, seed=5)
  second = kmeans.assign_labels_kmeans(features, (6, 4), pca_dim=8, seed=5)
  np.testing.assert_array_equal(first.labels, second.labels)
  np.testing.assert_array_equal(first.inertia, second.inertia)


# --------------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("num_clusters, match", [
    ((6, 600), r"num_clusters\[1\]: K=600 .*N=600"),
    ((700,), r"K=700 .*N=600"),
    ((0,), r"num_clusters\[0\] must be an int >= 1, got 0"),
    ((6.0,), r"num_clusters\[0\] must be an int >= 1, got 6.0"),
    (6, r"num_clusters must be a sequence with one K per head.*got 6"),
    ((), r"num_clusters: got no heads"),
])
def test_bad_num_clusters_raise(num_clusters, match):
  features, _ = _blobs(0)
  with pytest.raises(ValueError, match=match):
    kmeans.assign_labels_kmeans(features, num_clusters)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_features_raise_with_the_count(bad_value):
  features, _ = _blobs(0)
  features[[3, 40, 41], [0, 5, 9]] = bad_value
  with pytest.raises(ValueError, match=r"features: 3 non-finite values \(NaN or inf"):
    kmeans.assign_labels_kmeans(features, (6,), pca_dim=8)
  with pytest.raises(ValueError, match=r"3 non-finite values .* in the PCA sample of 599 rows"):
    kmeans.preprocess_features(features, pca_dim=8, pca_sample_size=599, seed=0)  # 1 row left out


@pytest.mark.parametrize("features, match", [
    (np.zeros(600, np.float32), r"expected a 2-D array \[N, D\] with N, D >= 1, got shape \(600,\)"),
    (np.zeros((2, 300, 4), np.float32), r"expected a 2-D array .*got shape \(2, 300, 4\)"),
    (np.zeros((600, 0), np.float32), r"got shape \(600, 0\)"),
    (np.ones((600, 8), np.int32), r"dtype must be one of \('float16', 'float32', 'float64'\), got int32"),
])
def test_bad_features_raise(features, match):
  with pytest.raises(ValueError, match=match):
    kmeans.assign_labels_kmeans(features, (6,))


def test_too_few_rows_for_the_pca_raise():
  features = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
  with pytest.raises(ValueError, match=r"PCA to 64 dims \(pca_dim=256, D=64\) needs more than 64 rows.*"
                     r"got 40 .*pass pca_dim <= 39"):
    kmeans.assign_labels_kmeans(features, (4,))
  with pytest.raises(ValueError, match=r"needs more than 16 rows .*got 10 \(N=40, pca_sample_size=10\)"):
    kmeans.preprocess_features(features, pca_dim=16, pca_sample_size=10)
  assert kmeans.assign_labels_kmeans(features, (4,), pca_dim=39).labels.shape == (1, 40)


def test_whitening_zeroes_the_components_of_features_of_lower_rank(caplog):
  rng = np.random.default_rng(0)
  features = (rng.normal(size=(500, 3)) @ rng.normal(size=(3, 16)) + 5.0).astype(np.float32)
  with caplog.at_level(logging.WARNING, logger="selabel_tf.kmeans"):
    projected = kmeans._pca_project(features, pca_dim=8, whiten=True, pca_sample_size=None, seed=0)
  assert "vary along only 3 of the 8 directions" in caplog.text
  np.testing.assert_array_equal(projected[:, 3:], 0.0)
  np.testing.assert_allclose(np.cov(projected[:, :3], rowvar=False, bias=True), np.eye(3), atol=1e-4)
  preprocessed = kmeans.preprocess_features(features, pca_dim=8)
  np.testing.assert_allclose(np.linalg.norm(preprocessed, axis=1), 1.0, rtol=1e-5)
  assert not np.any(kmeans.preprocess_features(features, pca_dim=8, whiten=False)[:, :3] == 0.0)


def test_equal_rows_raise():
  with pytest.raises(ValueError, match=r"every row is the same"):
    kmeans.preprocess_features(np.ones((50, 4), np.float32), pca_dim=2)


@pytest.mark.parametrize("options, match", [
    (dict(pca_dim=0), r"pca_dim must be an int >= 1, got 0"),
    (dict(num_iterations=0), r"num_iterations must be an int >= 1, got 0"),
    (dict(seed=-1), r"seed must be an int in \[0, 2147483647\], got -1"),
    (dict(pca_sample_size=0), r"pca_sample_size must be an int >= 1, got 0"),
])
def test_bad_options_raise(options, match):
  features, _ = _blobs(0)
  with pytest.raises(ValueError, match=match):
    kmeans.assign_labels_kmeans(features, (6,), **options)


def test_normalise_rows_matches_numpy_float64_and_keeps_zero_rows():
  rng = np.random.default_rng(0)
  features = rng.gamma(1.0, size=(300, 40)).astype(np.float16)
  features[7] = 0
  normalised = kmeans.normalise_rows(features)
  reference = features.astype(np.float64)
  norms = np.linalg.norm(reference, axis=1, keepdims=True)
  reference = np.divide(reference, norms, out=np.zeros_like(reference), where=norms > 0)
  assert normalised.dtype == np.float32 and normalised.shape == (300, 40)
  np.testing.assert_allclose(normalised, reference, rtol=1e-6, atol=1e-7)
  assert not normalised[7].any()
  with pytest.raises(ValueError, match="every row is the same after L2 normalisation"):
    kmeans.normalise_rows(np.tile([[1.0, 2.0]], (5, 1)) * np.arange(1, 6)[:, None])  # one direction
  with pytest.raises(ValueError, match="1 non-finite values"):
    features = features.astype(np.float32)
    features[3, 2] = np.nan
    kmeans.normalise_rows(features)


def test_l2_preprocessing_labels_are_faiss_kmeans_on_the_normalised_rows():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(500, 24)).astype(np.float32) + 3 * rng.integers(0, 4, size=(500, 1))
  result = kmeans.assign_labels_kmeans(features, (4, 7), preprocessing="l2", seed=5)
  rows = features / np.linalg.norm(features, axis=1, keepdims=True)
  np.testing.assert_allclose(rows, features / np.linalg.norm(features.astype(np.float64), axis=1,
                                                             keepdims=True), rtol=1e-6)
  for head, k in enumerate((4, 7)):
    reference = faiss.Kmeans(24, k, niter=20, seed=5 + head, max_points_per_centroid=500)
    reference.train(rows)
    distances, assigned = reference.index.search(rows, 1)
    np.testing.assert_array_equal(result.labels[head], assigned[:, 0])
    np.testing.assert_allclose(result.inertia[head], distances.sum(dtype=np.float64), rtol=1e-5)
  with pytest.raises(ValueError, match=r"preprocessing must be one of \('whitened_pca', 'l2'\), got 'pca'"):
    kmeans.assign_labels_kmeans(features, (4,), preprocessing="pca")
