"""Tests for `selabel_tf.label_store`: labelling from stored features, one head's log-probs at a time."""

import errno
import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import special

import selabel_tf
from selabel_tf import label_store


def _features_and_heads(seed=0, num_examples=3000, dim=48, clusters=(20, 7)):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(12, dim))
  features = (centres[rng.integers(0, 12, num_examples)] + 0.7 * rng.normal(size=(num_examples, dim)))
  kernels = [rng.normal(size=(dim, k)) * 0.4 for k in clusters]
  biases = [rng.normal(size=k) * 0.3 for k in clusters]
  return features.astype(np.float32), kernels, biases


def _reference_log_probs(features, kernel, bias):
  return special.log_softmax(features.astype(np.float64) @ kernel + bias, axis=1)


def test_head_log_probs_match_a_float64_reference_for_any_rows():
  features, kernels, biases = _features_and_heads()
  heads = label_store.LinearHeads(features, kernels, biases)
  assert len(heads) == 2 and heads[0].shape == (3000, 20) and heads[1].shape == (3000, 7)
  for t in range(2):
    expected = _reference_log_probs(features, kernels[t], biases[t])
    np.testing.assert_allclose(heads[t][0:3000].numpy(), expected, atol=2e-5, rtol=0)
    np.testing.assert_allclose(heads[t][1234:1300].numpy(), expected[1234:1300], atol=2e-5, rtol=0)
  labels = np.arange(3000) % 7
  np.testing.assert_allclose(heads[1].label_log_probs(labels),
                             _reference_log_probs(features, kernels[1], biases[1])[np.arange(3000), labels],
                             atol=2e-5)


def test_bfloat16_features_and_matmul_stay_close_to_the_reference():
  features, kernels, biases = _features_and_heads()
  narrow = features.astype(tf.bfloat16.as_numpy_dtype)
  heads = label_store.LinearHeads(narrow, kernels, biases, matmul_dtype="bfloat16")
  expected = _reference_log_probs(features, kernels[0], biases[0])
  error = np.abs(heads[0][0:3000].numpy() - expected)
  # bfloat16 keeps 8 significant bits: each logit within a few of its ulps (|logit| < 16: 2^-4).
  assert error.max() < 0.15 and error.mean() < 0.02, (error.max(), error.mean())


def test_bfloat16_product_accumulates_and_returns_float32():
  """The bfloat16 product rounds its inputs only: against float64 on the same rounded inputs it is
  float32-close (a bfloat16 result would be off by up to 2^-9 |logit|, ~0.01 here)."""
  features, kernels, biases = _features_and_heads()
  bf16 = tf.bfloat16.as_numpy_dtype
  narrow = features.astype(bf16)
  heads = label_store.LinearHeads(narrow, kernels, biases, matmul_dtype="bfloat16")
  for t in range(2):
    rounded_kernel = kernels[t].astype(np.float32).astype(bf16).astype(np.float64)
    expected = _reference_log_probs(narrow.astype(np.float64), rounded_kernel, biases[t])
    got = heads[t][0:3000].numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    per_replica = label_store.per_replica_log_probs(tf.distribute.get_strategy(), tf.constant(narrow),
                                                    kernels[t], biases[t], matmul_dtype="bfloat16")
    np.testing.assert_allclose(per_replica.numpy(), expected, atol=2e-5, rtol=0)


def test_labels_from_features_equal_labels_from_the_stored_log_probs_when_re_read():
  """A float16 kernel is rebuilt from the head at every re-centring: read in parts or whole, the
  same numbers, so the same labels and iterations."""
  features, kernels, biases = _features_and_heads()
  heads = label_store.LinearHeads(features, kernels, biases, rows_per_read=700)
  stored = [heads[t][0:3000].numpy() for t in range(2)]
  options = dict(tol=1e-3, storage_dtype="float16")
  from_features = selabel_tf.assign_labels(heads, 10.0, **options)
  from_store = selabel_tf.assign_labels(stored, 10.0, **options)
  np.testing.assert_array_equal(from_features.labels, from_store.labels)
  np.testing.assert_array_equal(from_features.iterations, from_store.iterations)


@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_derived_recentrings_reach_the_same_solution(storage_dtype):
  """With float32's range the annealing stages and re-centrings come from the kernel itself (no
  re-read of the features); the solution is the one of the stored log-probs (tol 1e-4)."""
  features, kernels, biases = _features_and_heads(seed=1)
  heads = label_store.LinearHeads(features, [k * 3 for k in kernels], biases, rows_per_read=1000)
  stored = [heads[t][0:3000].numpy() for t in range(2)]
  options = dict(tol=1e-4, storage_dtype=storage_dtype)
  from_features = selabel_tf.assign_labels(heads, 25.0, **options)
  from_store = selabel_tf.assign_labels(stored, 25.0, **options)
  assert np.all(from_features.converged)
  agreement = np.mean(from_features.labels == from_store.labels, axis=1)
  assert np.all(agreement >= (0.995 if storage_dtype == "float32" else 0.98)), agreement
  for t in range(2):
    np.testing.assert_allclose(from_features.log_row_scale[t] - from_features.log_row_scale[t].max(),
                               from_store.log_row_scale[t] - from_store.log_row_scale[t].max(),
                               atol=0.05 if storage_dtype == "float32" else 0.2)


def test_bad_shapes_name_what_is_wrong():
  features, kernels, biases = _features_and_heads()
  with pytest.raises(ValueError, match=r"features \(3000, 48\) and kernel \(47, 20\) do not compose"):
    label_store.LinearHeadLogProbs(features, kernels[0][:47], biases[0])
  with pytest.raises(ValueError, match=r"bias \(7,\) does not match the kernel's K=20"):
    label_store.LinearHeadLogProbs(features, kernels[0], biases[1])
  with pytest.raises(ValueError, match="matmul_dtype must be one of"):
    label_store.LinearHeadLogProbs(features, kernels[0], biases[0], matmul_dtype="float16")


def test_store_bytes_is_the_documented_formula():
  n, k, d = 1_281_167, [3000] * 10, 4096
  assert label_store.store_bytes(n, k, d, "log_probs", kernel_dtype="float32") == n * 30000 * 4 + n * 3000 * 4
  assert label_store.store_bytes(n, k, d, "features", "bfloat16", "bfloat16") == n * 4096 * 2 + n * 3000 * 2
  assert label_store.store_bytes(n, k, d, "features", "bfloat16", "bfloat16", features_in_file=True) == n * 3000 * 2


def test_non_finite_features_are_reported_before_any_solving():
  features, kernels, biases = _features_and_heads()
  features[17, 3] = np.nan
  features[2000, 0] = np.inf
  with pytest.raises(ValueError, match="log_probs head 0 has 2 non-finite entries"):
    selabel_tf.assign_labels(label_store.LinearHeads(features, kernels, biases), 10.0,
                             storage_dtype="bfloat16")


def test_a_computed_head_whose_cluster_underflows_builds_from_its_statistics():
  """A cluster no example likes (its row of P^lam underflows around log alpha = 0) makes the one-pass
  build fall back to the statistics' build, once: the solve still converges to equal sizes."""
  features, kernels, biases = _features_and_heads(clusters=(6,))
  biases[0][5] = -6.0  # p(cluster 5) ~ e^-6 or less: below e^-150 at lambda 25 (bfloat16: e^-87)
  heads = label_store.LinearHeads(features, kernels, biases)
  result = selabel_tf.assign_labels(heads, 25.0, tol=1e-2, storage_dtype="bfloat16", anneal=False)
  assert np.all(result.converged)
  assert result.cluster_sizes(0).min() >= 3000 // 6 * 0.9


def test_linear_heads_hold_each_head_s_weights_once():
  """Given numpy weights, the heads keep float32 tensors and not the arrays as well; given float32 tensors,
  they keep those very tensors (no copy): the weights of T heads are held once."""
  rng = np.random.default_rng(0)
  features = rng.normal(size=(20, 6)).astype(np.float32)
  arrays = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(2)]
  heads = label_store.LinearHeads(features, arrays, [np.zeros(4, np.float32)] * 2)
  assert all(isinstance(k, tf.Tensor) and k is heads[t].kernel for t, k in enumerate(heads.kernels))
  assert all(isinstance(b, tf.Tensor) and b is heads[t].bias for t, b in enumerate(heads.biases))
  tensors = [tf.constant(a) for a in arrays]
  biases = [tf.zeros([4])] * 2
  heads = label_store.LinearHeads(features, tensors, biases)
  assert all(heads[t].kernel is tensors[t] and heads.kernels[t] is tensors[t] for t in range(2))
  from_arrays = label_store.LinearHeads(features, arrays, biases)
  np.testing.assert_array_equal(heads[1][0:20].numpy(), from_arrays[1][0:20].numpy())


@pytest.mark.parametrize("dtype,page_cache", [("float32", True), ("bfloat16", True), ("bfloat16", False)])
def test_feature_file_reads_back_rows_written_in_any_order(tmp_path, dtype, page_cache):
  """Rows written by shuffled index, in batches (runs of consecutive indices and single rows), read back
  by any row range equal the array they came from, bit for bit; the file is unnamed (the directory stays
  empty) and takes its size on disk."""
  np_dtype = tf.as_dtype(dtype).as_numpy_dtype
  rng = np.random.default_rng(0)
  expected = rng.normal(size=(1000, 24)).astype(np_dtype)
  stored = label_store.FeatureFile(str(tmp_path), expected.shape, np_dtype, page_cache=page_cache)
  assert (stored.shape, stored.dtype, stored.nbytes, len(stored)) == (
      (1000, 24), np.dtype(np_dtype), expected.nbytes, 1000)
  assert os.listdir(tmp_path) == []
  assert os.fstat(stored._file.fileno()).st_size == expected.nbytes
  stored[np.arange(0, 300)] = expected[:300]  # one run
  order = rng.permutation(np.arange(300, 1000))
  for batch in np.array_split(order, 9):  # scattered rows
    stored[batch] = expected[batch]
  for rows in (slice(0, 1000), slice(0, 1), slice(299, 301), slice(997, 2000), slice(500, 500)):
    np.testing.assert_array_equal(stored[rows].view(np.uint8), expected[rows].view(np.uint8))
  stored[np.array([5])] = expected[6:7]  # written after reads (page_cache=False: dropped again)
  np.testing.assert_array_equal(stored[5:6].view(np.uint8), expected[6:7].view(np.uint8))
  assert stored[0:7].dtype == np.dtype(np_dtype)
  stored.close()
  assert os.listdir(tmp_path) == []


def test_feature_file_names_bad_input(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"directory '/no/such/dir' does not exist"):
    label_store.FeatureFile("/no/such/dir", (4, 3), np.float32)

  def full_disk(fd, offset, length):
    raise OSError(errno.ENOSPC, "No space left on device")

  with monkeypatch.context() as patch:
    patch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(OSError, match=r"FeatureFile: no room in '.*' for 0.02 GB of features \(1000, 4096\) "
                                      r"float32"):
      label_store.FeatureFile(str(tmp_path), (1000, 4096), np.float32)
  assert os.listdir(tmp_path) == []
  stored = label_store.FeatureFile(str(tmp_path), (4, 3), np.float32)
  with pytest.raises(ValueError, match=r"index 2...4 outside \[0, 4\)"):
    stored[np.array([2, 4])] = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match=r"2 rows need as many indices, got \(3,\)"):
    stored[np.array([0, 1, 2])] = np.zeros((2, 3), np.float32)
  with pytest.raises(TypeError, match="takes row slices"):
    stored[3]  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match="only contiguous row slices"):
    stored[0:4:2]  # pylint: disable=pointless-statement


def test_labels_from_a_feature_file_equal_labels_from_features_in_memory(tmp_path):
  """The heads computed from the file read the same bytes: the same labels, iterations and alpha bit for
  bit, bfloat16 features and kernel; closing the heads frees the file."""
  features, kernels, biases = _features_and_heads()
  narrow = features.astype(tf.bfloat16.as_numpy_dtype)
  stored = label_store.FeatureFile(str(tmp_path), narrow.shape, narrow.dtype)
  stored[np.arange(len(narrow))] = narrow
  options = dict(tol=1e-3, storage_dtype="bfloat16")
  in_memory = selabel_tf.assign_labels(
      label_store.LinearHeads(narrow, kernels, biases, rows_per_read=700), 10.0, **options)
  heads = label_store.LinearHeads(stored, kernels, biases, rows_per_read=700)
  from_file = selabel_tf.assign_labels(heads, 10.0, **options)
  np.testing.assert_array_equal(from_file.labels, in_memory.labels)
  np.testing.assert_array_equal(from_file.iterations, in_memory.iterations)
  for t in range(2):
    np.testing.assert_array_equal(from_file.log_row_scale[t], in_memory.log_row_scale[t])
  heads.close()
  assert stored._file.closed


def test_feature_file_works_where_the_os_has_no_fadvise_or_fallocate(tmp_path, monkeypatch):
  """macOS has neither posix_fadvise nor posix_fallocate: the file grows on write, reads are the same."""
  monkeypatch.delattr(os, "posix_fadvise", raising=False)
  monkeypatch.delattr(os, "posix_fallocate", raising=False)
  expected = np.arange(60, dtype=np.float32).reshape(20, 3)
  stored = label_store.FeatureFile(str(tmp_path), expected.shape, np.float32)
  stored[np.arange(20)[::-1]] = expected[::-1]
  np.testing.assert_array_equal(stored[0:20], expected)
  assert os.fstat(stored._file.fileno()).st_size == expected.nbytes
  stored.close()
