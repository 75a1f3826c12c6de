"""K-means pseudo-labels: the paper's "ours (K-means)" baseline (Table 8), DeepCluster-style.

Instead of solving the equipartition problem by Sinkhorn-Knopp (`selabel_tf.labeller`), each head's
pseudo-labels are the K-means clusters of the network's feature vectors, as in DeepCluster (Caron et
al., ECCV 2018, `clustering.py`):

  1. `preprocess_features`: PCA to `pca_dim` dimensions, whitened (every component scaled to unit
     variance), then every row scaled to unit L2 norm (`preprocessing="whitened_pca"`, DeepCluster's);
     or `normalise_rows`: every row scaled to unit L2 norm, nothing else (`preprocessing="l2"`: K-means
     in the cosine geometry the kNN evaluation reads; README "Quality" compares the two).
  2. K-means (faiss `Kmeans`: Lloyd iterations from K randomly drawn rows, empty clusters re-split by
     faiss after each iteration) on the preprocessed rows, once per head with its own K and seed.

The features are preprocessed once and shared by all heads.

The PCA is the transform of DeepCluster's faiss `PCAMatrix(D, pca_dim, eigen_power=-0.5)`, computed
with numpy and LAPACK instead, for two reasons. faiss forms the covariance in float32 as
X^T X - n mean mean^T, which cancels catastrophically when the mean is large against the spread
(non-negative ReLU features): the small eigenvalues, which whitening scales up the most, become rounding
noise. Here the rows are centred on their float64 mean first and the covariance is accumulated in
float64. And faiss computes all D eigenvectors (LAPACK syev), the slowest part of the preprocessing at
D=4096; only the leading `pca_dim` are computed here (syevr).

Threads: the PCA runs on numpy's BLAS threads, K-means on faiss' OpenMP threads (as many as
`faiss.omp_get_max_threads()`: `OMP_NUM_THREADS`, or every core). This module changes neither setting.

Memory. Besides the input and the float32 output [N, pca_dim] (with "l2": [N, D], a normalised copy of
the input: e.g. 47 GB for ImageNet's 1.28M examples of 224 px AlexNet's 9216-d pool5), the PCA holds a
float64 [D, D] covariance and one float32 chunk of rows at a time; with `pca_sample_size=S` also the
float32 sample [S, D]. The input is read chunk by chunk (two passes over the training rows, one over all rows), so it
may be an `np.memmap`, or any object with `shape`, `dtype` and numpy-style row indexing (slices and
sorted integer arrays) that produces rows on demand.
"""

import dataclasses
import logging
import time
from typing import Optional, Sequence

import faiss
import numpy as np
from scipy import linalg

logger = logging.getLogger(__name__)

FEATURE_DTYPES = ("float16", "float32", "float64")
PREPROCESSINGS = ("whitened_pca", "l2")  # `assign_labels_kmeans`' preprocessing of the features
# Eigenvalues below this fraction of the largest are float32 rounding noise of a centred covariance;
# whitening would scale noise up to unit variance, so those components are set to 0 instead.
_MIN_RELATIVE_EIGENVALUE = 1e-6
_CHUNK_BYTES = 1 << 26  # float32 bytes of input rows converted and projected at once
_MAX_FAISS_SEED = 2**31 - 1  # faiss' seed is a C int


@dataclasses.dataclass(frozen=True)
class KMeansAssignment:
  """The result of K-means self-labelling, per head t.

  Attributes:
    labels: int64 [T, N], the cluster of every example, in 0..K_t-1.
    inertia: float64 [T], the final K-means objective: the sum over examples of the squared distance
      between the example's preprocessed features and its cluster's centroid.
    seconds: wall time of the whole assignment (preprocessing and every head).
  """
  labels: np.ndarray
  inertia: np.ndarray
  seconds: float


def preprocess_features(features,
                        *,
                        pca_dim: int = 256,
                        whiten: bool = True,
                        pca_sample_size: Optional[int] = None,
                        seed: int = 0) -> np.ndarray:
  """PCA (optionally whitened) and L2 normalisation of features, as DeepCluster's `preprocess_features`.

  Args:
    features: float16/float32/float64 [N, D] array, or an array-like with `shape`, `dtype` and row
      indexing (see the module docstring); read chunk by chunk and converted to float32.
    pca_dim: output dimensions; clamped to D.
    whiten: scale every principal component to unit variance before the L2 normalisation (DeepCluster
      does); components of rounding-noise variance (features of rank below min(pca_dim, D)) are set
      to 0 instead, with a logged warning. False keeps the plain PCA projection.
    pca_sample_size: train the PCA on this many rows drawn at random (seeded by `seed`), then project
      all rows; None (or >= N) trains on all rows.
    seed: seed of the PCA sample.

  Returns:
    float32 [N, min(pca_dim, D)]: the projected rows, each of unit L2 norm (a row equal to the mean
    projects to zero and stays zero).

  Raises:
    ValueError: on features that are not 2-D float16/32/64, contain NaN or inf, or are all equal, on
      options out of range, and on fewer than min(pca_dim, D) + 1 rows to train the PCA on.
  """
  projected = _pca_project(features, pca_dim=pca_dim, whiten=whiten, pca_sample_size=pca_sample_size,
                           seed=seed)
  for start, stop in _row_chunks(projected.shape[0], projected.shape[1]):
    _normalise_in_place(projected[start:stop])
  return projected


def assign_labels_kmeans(features,
                         num_clusters: Sequence[int],
                         *,
                         preprocessing: str = "whitened_pca",
                         pca_dim: int = 256,
                         num_iterations: int = 20,
                         seed: int = 0,
                         pca_sample_size: Optional[int] = None,
                         verbose: bool = False) -> KMeansAssignment:
  """Pseudo-labels per head by K-means on preprocessed features (the paper's "ours (K-means)").

  The features are preprocessed once (`preprocessing`: "whitened_pca", `preprocess_features`'
  whitened PCA to `pca_dim` then L2 normalisation, DeepCluster's; or "l2", `normalise_rows`' L2
  normalisation alone); head t then runs faiss K-means with K = num_clusters[t], `num_iterations`
  Lloyd iterations and seed `seed + t` on all N rows (no subsampling), so that heads of equal K start
  from different rows.

  Args:
    features: float16/float32/float64 [N, D] features of the N examples (see `preprocess_features`).
    num_clusters: one K per head, e.g. (3000,) or (10, 10, 64, 64); each 1 <= K < N.
    preprocessing: one of `PREPROCESSINGS`, see above.
    pca_dim: dimensions kept by the PCA (clamped to D); with "l2" not used.
    num_iterations: K-means iterations per head.
    seed: seed of the PCA sample and of head 0's K-means initialisation.
    pca_sample_size: train the PCA on this many random rows (None: all rows); see
      `preprocess_features`. With "l2" not used.
    verbose: print faiss' per-iteration K-means objective.

  Returns:
    A `KMeansAssignment` with labels int64 [T, N] and inertia float64 [T].

  Raises:
    ValueError: on num_clusters that is not a non-empty sequence of ints with 1 <= K < N, on options
      out of range, and on the features errors of `preprocess_features`.
  """
  start_time = time.perf_counter()
  features = _check_features(features)
  num_clusters = _check_num_clusters(num_clusters, _shape_of(features)[0])
  _check_int("num_iterations", num_iterations, minimum=1)
  _check_int("seed", seed, minimum=0, maximum=_MAX_FAISS_SEED - len(num_clusters) + 1)
  if preprocessing == "whitened_pca":
    preprocessed = preprocess_features(features, pca_dim=pca_dim, whiten=True,
                                       pca_sample_size=pca_sample_size, seed=seed)
  elif preprocessing == "l2":
    preprocessed = normalise_rows(features)
  else:
    raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")
  logger.info("K-means labels: features [%d, %d] preprocessed (%s) to [%d, %d] in %.1f s",
              *_shape_of(features), preprocessing, *preprocessed.shape, time.perf_counter() - start_time)
  labels = np.empty((len(num_clusters), preprocessed.shape[0]), np.int64)
  inertia = np.empty(len(num_clusters), np.float64)
  for head, head_clusters in enumerate(num_clusters):
    head_start = time.perf_counter()
    labels[head], inertia[head] = _kmeans_labels(preprocessed, head_clusters, seed=seed + head,
                                                 num_iterations=num_iterations, verbose=verbose)
    num_empty = int(np.count_nonzero(np.bincount(labels[head], minlength=head_clusters) == 0))
    logger.log(logging.WARNING if num_empty else logging.INFO,
               "K-means labels: head %d, K=%d, inertia %.6g, %d empty clusters, %.1f s", head,
               head_clusters, inertia[head], num_empty, time.perf_counter() - head_start)
  return KMeansAssignment(labels=labels, inertia=inertia, seconds=time.perf_counter() - start_time)


def normalise_rows(features) -> np.ndarray:
  """float32 [N, D]: every row of the features scaled to unit L2 norm (a zero row stays zero).

  Args:
    features: float16/float32/float64 [N, D] array or array-like (see the module docstring), read chunk
      by chunk.

  Raises:
    ValueError: on features that are not 2-D float16/32/64, contain NaN or inf, or whose rows are all
      the same after the normalisation.
  """
  features = _check_features(features)
  num_examples, dim = _shape_of(features)
  normalised = np.empty((num_examples, dim), np.float32)
  all_equal = True
  for start, stop in _row_chunks(num_examples, dim):
    rows = _float32_rows(features, slice(start, stop), f" in rows [{start}, {stop})")
    normalised[start:stop] = _normalise_in_place(rows)
    all_equal = all_equal and bool(np.all(rows == normalised[0]))
  if all_equal and num_examples > 1:
    raise ValueError("features: every row is the same after L2 normalisation; K-means needs rows that "
                     "differ")
  return normalised


# --------------------------------------------------------------------------------------------------
# The two steps.


def _pca_project(features, *, pca_dim, whiten, pca_sample_size, seed):
  """float32 [N, min(pca_dim, D)]: the features projected on their leading principal components.

  With `whiten`, every component has unit variance over the training rows, or is 0 where its variance
  is rounding noise (no L2 step here).
  """
  features = _check_features(features)
  num_examples, dim = _shape_of(features)
  _check_int("pca_dim", pca_dim, minimum=1)
  if not isinstance(whiten, (bool, np.bool_)):
    raise ValueError(f"whiten must be a bool, got {whiten!r}")
  if pca_sample_size is not None:
    _check_int("pca_sample_size", pca_sample_size, minimum=1)
  _check_int("seed", seed, minimum=0)
  out_dim = min(pca_dim, dim)

  if pca_sample_size is None or pca_sample_size >= num_examples:
    train_rows, num_train, where = features, num_examples, ""
  else:
    sample = np.sort(np.random.default_rng(seed).choice(num_examples, pca_sample_size, replace=False))
    train_rows = _float32_rows(features, sample, f" in the PCA sample of {pca_sample_size} rows")
    num_train, where = pca_sample_size, " of the PCA sample"
  if num_train <= out_dim:
    raise ValueError(
        f"PCA to {out_dim} dims (pca_dim={pca_dim}, D={dim}) needs more than {out_dim} rows to train "
        f"on (the centred rows span at most rows - 1 directions), got {num_train} (N={num_examples}, "
        f"pca_sample_size={pca_sample_size}); pass pca_dim <= {num_train - 1} or more rows")

  def train_chunks():
    for start, stop in _row_chunks(num_train, dim):
      yield _float32_rows(train_rows, slice(start, stop), f" in rows [{start}, {stop}){where}")

  mean = np.zeros(dim, np.float64)
  for rows in train_chunks():
    mean += rows.sum(axis=0, dtype=np.float64)
  mean = (mean / num_train).astype(np.float32)
  # Centred before the product: X^T X - n mean mean^T would cancel in float32 (see module docstring).
  covariance = np.zeros((dim, dim), np.float64)
  for rows in train_chunks():
    rows -= mean
    covariance += rows.T @ rows
  covariance /= num_train
  eigenvalues, eigenvectors = _leading_eigenvectors(covariance, out_dim)
  del covariance
  eigenvectors *= _component_scales(eigenvalues, whiten, pca_dim, dim)
  projection = eigenvectors.astype(np.float32)  # [D, out_dim]

  projected = np.empty((num_examples, out_dim), np.float32)
  for start, stop in _row_chunks(num_examples, dim):
    rows = _float32_rows(features, slice(start, stop), f" in rows [{start}, {stop})")
    rows -= mean
    np.matmul(rows, projection, out=projected[start:stop])
  return projected


def _leading_eigenvectors(covariance, count):
  """float64 [count] eigenvalues, descending, and float64 [D, count] eigenvectors of a symmetric [D, D].

  Only the leading `count` are computed (LAPACK's syevr). Each eigenvector's sign makes its entry of
  largest magnitude positive, so that the result does not depend on the LAPACK build.
  """
  dim = covariance.shape[0]
  eigenvalues, eigenvectors = linalg.eigh(covariance, subset_by_index=(dim - count, dim - 1),
                                          driver="evr", overwrite_a=True, check_finite=False)
  eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
  largest = eigenvectors[np.argmax(np.abs(eigenvectors), axis=0), np.arange(count)]
  return eigenvalues.copy(), eigenvectors * np.where(largest < 0, -1.0, 1.0)


def _kmeans_labels(preprocessed, num_clusters, *, seed, num_iterations, verbose):
  """(int64 [N] labels, float inertia) of faiss K-means on float32 [N, d] rows, all rows used."""
  num_examples, dim = preprocessed.shape
  kmeans = faiss.Kmeans(dim, num_clusters, niter=num_iterations, seed=seed, verbose=bool(verbose),
                        # faiss subsamples above K * max_points_per_centroid rows; N never is.
                        max_points_per_centroid=num_examples)
  kmeans.train(preprocessed)
  squared_distances, labels = kmeans.index.search(preprocessed, 1)
  return labels[:, 0].astype(np.int64), float(squared_distances.sum(dtype=np.float64))


# --------------------------------------------------------------------------------------------------
# Checks and helpers.


def _shape_of(features):
  return tuple(int(d) for d in features.shape)


def _check_features(features):
  """The features as an array-like [N, D] of a float dtype (converted with np.asarray if needed)."""
  if not (hasattr(features, "shape") and hasattr(features, "dtype")):
    features = np.asarray(features)
  shape = _shape_of(features)
  if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
    raise ValueError(f"features: expected a 2-D array [N, D] with N, D >= 1, got shape {shape}")
  if np.dtype(features.dtype).name not in FEATURE_DTYPES:
    raise ValueError(f"features: dtype must be one of {FEATURE_DTYPES}, got {np.dtype(features.dtype)}")
  return features


def _float32_rows(features, rows, where):
  """C-contiguous float32 copy of features[rows] (never a view: callers centre it in place), checked
  to be finite."""
  values = np.asarray(features[rows], dtype=np.float32, order="C")
  if isinstance(features, np.ndarray) and np.may_share_memory(values, features):
    values = values.copy()
  num_bad = values.size - int(np.count_nonzero(np.isfinite(values)))
  if num_bad:
    raise ValueError(f"features: {num_bad} non-finite values (NaN or inf, after conversion to float32)"
                     f"{where} of the [{features.shape[0]}, {features.shape[1]}] features; K-means "
                     f"needs finite features")
  return values


def _component_scales(eigenvalues, whiten, pca_dim, dim):
  """float64 [out_dim]: the factor of each principal component, 1/sqrt(eigenvalue) or 1 (no whiten).

  With `whiten`, components whose variance is rounding noise (dead ReLU units, features of lower rank
  than pca_dim) get factor 0, as a pseudo-inverse would: scaled to unit variance they would be pure
  noise, as heavy in the K-means distances as the real directions.
  """
  if not eigenvalues[0] > 0:
    raise ValueError("features: every row is the same (zero variance); PCA and K-means need rows "
                     "that differ")
  if not whiten:
    return np.ones_like(eigenvalues)
  reliable = eigenvalues > _MIN_RELATIVE_EIGENVALUE * eigenvalues[0]
  num_reliable = int(np.count_nonzero(reliable))
  if num_reliable < eigenvalues.shape[0]:
    logger.warning(
        "preprocess_features: the features vary along only %d of the %d directions kept "
        "(pca_dim=%d, D=%d; variance above %g of the largest); whitening sets the other %d "
        "components to 0 (pass pca_dim <= %d to drop them)", num_reliable, eigenvalues.shape[0],
        pca_dim, dim, _MIN_RELATIVE_EIGENVALUE, eigenvalues.shape[0] - num_reliable, num_reliable)
  return np.where(reliable, 1.0 / np.sqrt(np.where(reliable, eigenvalues, 1.0)), 0.0)


def _check_num_clusters(num_clusters, num_examples):
  """num_clusters as a tuple of ints, one per head, each in [1, N)."""
  if isinstance(num_clusters, (str, bytes)) or not isinstance(num_clusters, (Sequence, np.ndarray)):
    raise ValueError(f"num_clusters must be a sequence with one K per head, e.g. (3000,) or "
                     f"(10, 10, 64, 64), got {num_clusters!r}")
  if len(num_clusters) == 0:
    raise ValueError("num_clusters: got no heads; expected one K per head, e.g. (3000,)")
  for head, head_clusters in enumerate(num_clusters):
    if (isinstance(head_clusters, (bool, np.bool_))
        or not isinstance(head_clusters, (int, np.integer)) or head_clusters < 1):
      raise ValueError(f"num_clusters[{head}] must be an int >= 1, got {head_clusters!r}")
    if head_clusters >= num_examples:
      raise ValueError(f"num_clusters[{head}]: K={head_clusters} clusters need more examples than "
                       f"clusters, got N={num_examples}; need K < N")
  return tuple(int(k) for k in num_clusters)


def _check_int(name, value, *, minimum, maximum=None):
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum
      or (maximum is not None and value > maximum)):
    allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ValueError(f"{name} must be an int {allowed}, got {value!r}")


def _normalise_in_place(rows):
  """float32 rows [n, d], each scaled to unit L2 norm in place (a zero row stays zero); returns rows."""
  rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.finfo(np.float32).tiny)
  return rows


def _row_chunks(num_rows, dim):
  """(start, stop) row ranges of about _CHUNK_BYTES of float32 each."""
  chunk_rows = max(1, _CHUNK_BYTES // (4 * dim))
  return [(start, min(start + chunk_rows, num_rows)) for start in range(0, num_rows, chunk_rows)]
