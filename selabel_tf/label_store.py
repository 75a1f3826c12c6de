"""What the label pass keeps: per-head log-probabilities, or the features once (paper sec. 3.4 at scale).

The labeller needs, per head t, the log-probabilities log_softmax(features @ W_t + b_t) [N, K_t] of
every example. Stored for every head they take N * sum_t K_t * 4 bytes (ImageNet, 3000 x 10 heads:
154 GB); the features they come from take N * D * itemsize (D = 4096 in bfloat16: 10.5 GB), once for
all heads. `LinearHeads` keeps the features and the heads' weights and gives each head's
log-probabilities on demand, part by part, as the labeller reads them (`assign_labels` accepts any
array-like with `.shape` and row slicing), so only one head's kernel exists at a time:

    peak bytes ~ N * D * s_features + N * K_max * s_kernel   (+ parts of `rows_per_read` rows)

per worker, with N the examples this worker holds (N / W when the labelling is sharded over W workers).
The official code does the same (it keeps the penultimate features and applies each head in turn).

Where even the features and one kernel do not fit, `FeatureFile` keeps the features in a file on local
disk instead: the label pass writes them there, and each head reads them once, part by part, with
ordinary reads (by default dropping the pages read from the OS page cache). The process then holds one
kernel and a part.
"""

import dataclasses
import errno
import os
import tempfile
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

STORES = ("log_probs", "features")
FEATURE_DTYPES = ("float32", "bfloat16", "float16")
MATMUL_DTYPES = ("float32", "bfloat16")
# Rows per part when a head's log-probs are computed: its float32 log-probs of one part (at K=3000,
# 98 MB) are the transient cost beside the stored features and the kernel.
DEFAULT_ROWS_PER_READ = 8192


def _row_range(rows, num_rows: int, owner: str):
  """(start, stop) of a contiguous row slice of `num_rows` rows; `owner` names the array in the errors."""
  if not isinstance(rows, slice):
    raise TypeError(f"{owner} takes row slices, got {rows!r}")
  start, stop, step = rows.indices(num_rows)
  if step != 1:
    raise ValueError(f"{owner}: only contiguous row slices")
  return start, stop


class FeatureFile:
  """A [N, D] array in an unnamed file on local disk: written by example index, read by row range.

  The file is created already unlinked (`tempfile.TemporaryFile`), so it takes disk space only while
  this object is open and nothing is left behind when the process ends, even by SIGKILL. Reads and
  writes are ordinary `pread`/`pwrite` calls, not a memory map: the rows read are the caller's array,
  and the file's pages, if kept (`page_cache`), are the OS page cache's, not the process's memory.

  Args:
    directory: an existing local directory (fast local disk: every labelled head reads the file once).
    shape: (N, D).
    dtype: numpy dtype of the rows (bfloat16 included).
    page_cache: whether the file's pages may stay in the OS page cache. False (the default): they are
      dropped once written (at the first read) and once read (`posix_fadvise`), so that the file takes
      no memory at all and each head reads it from the disk; a full page cache beside the labelling
      slowed it (README "Scale").

  `features[start:stop]` is a numpy array [stop - start, D]; `features[index] = rows` writes rows [B, D]
  at the int indices `index` [B] (any order); `.shape`, `.dtype`, `.nbytes`; `close()` frees the disk.
  """

  def __init__(self, directory: str, shape, dtype, *, page_cache: bool = False):
    if not os.path.isdir(directory):
      raise ValueError(f"FeatureFile: directory {directory!r} does not exist (a local directory on a "
                       "disk with room for the features)")
    self.shape = tuple(int(n) for n in shape)
    if len(self.shape) != 2:
      raise ValueError(f"FeatureFile: shape must be (N, D), got {self.shape}")
    self.dtype = np.dtype(dtype)
    self._row_bytes = self.shape[1] * self.dtype.itemsize
    self.nbytes = self.shape[0] * self._row_bytes
    self.page_cache = page_cache
    self._unsynced = False  # rows written since the pages were last dropped
    self._file = tempfile.TemporaryFile(dir=directory)
    try:
      self._reserve(directory)
      self._advise(0, 0, "POSIX_FADV_SEQUENTIAL")
    except BaseException:
      self._file.close()
      raise

  def _reserve(self, directory):
    """Takes the file's disk space now, so that a full disk fails here, not in the middle of a pass."""
    if not hasattr(os, "posix_fallocate"):  # e.g. macOS: grow on write
      os.ftruncate(self._file.fileno(), self.nbytes)
      return
    try:
      os.posix_fallocate(self._file.fileno(), 0, self.nbytes)
    except OSError as e:
      if e.errno == errno.ENOSPC:
        raise OSError(errno.ENOSPC, f"FeatureFile: no room in {directory!r} for {self.nbytes / 1e9:.2f} GB "
                      f"of features {self.shape} {self.dtype}") from None
      if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: grow on write
        raise
      os.ftruncate(self._file.fileno(), self.nbytes)

  def _advise(self, offset, length, advice):
    """posix_fadvise where the OS has it (not macOS): the page cache's handling of the file's pages."""
    if hasattr(os, "posix_fadvise"):
      os.posix_fadvise(self._file.fileno(), offset, length, getattr(os, advice))

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, rows):
    start, stop = _row_range(rows, self.shape[0], "FeatureFile")
    if self._unsynced and not self.page_cache:  # dirty pages cannot be dropped before they are written
      os.fsync(self._file.fileno())
      self._advise(0, 0, "POSIX_FADV_DONTNEED")
      self._unsynced = False
    out = np.empty((max(stop - start, 0), self.shape[1]), self.dtype)
    view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    while done < len(view):  # one pread returns at most ~2 GiB
      read = os.preadv(self._file.fileno(), [view[done:]], start * self._row_bytes + done)
      if read <= 0:
        raise OSError(f"FeatureFile: the file ended {len(view) - done} bytes early")
      done += read
    if not self.page_cache:
      self._advise(start * self._row_bytes, len(view), "POSIX_FADV_DONTNEED")
    return out

  def __setitem__(self, index, rows):
    index = np.asarray(index)
    rows = np.asarray(rows, self.dtype).reshape(-1, self.shape[1])
    if index.ndim != 1 or len(index) != len(rows):
      raise ValueError(f"FeatureFile: {len(rows)} rows need as many indices, got {index.shape}")
    if index.size and (index.min() < 0 or index.max() >= self.shape[0]):
      raise ValueError(f"FeatureFile: index {index.min()}...{index.max()} outside [0, {self.shape[0]})")
    order = np.argsort(index, kind="stable")
    index, rows = index[order], rows[order]
    # Runs of consecutive indices are written with one call each (a label pass in order: one per batch).
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    for run_start, run_stop in zip(np.r_[0, breaks], np.r_[breaks, len(index)]):
      data, done = memoryview(np.ascontiguousarray(rows[run_start:run_stop]).reshape(-1).view(np.uint8)), 0
      while done < len(data):
        done += os.pwrite(self._file.fileno(), data[done:], int(index[run_start]) * self._row_bytes + done)
    self._unsynced = True

  def close(self):
    """Frees the file's disk space (the object cannot be read afterwards)."""
    self._file.close()

  @classmethod
  def allocator(cls, directory: str):
    """`(shape, dtype) -> FeatureFile` in `directory`: the `allocate` of `inference.IndexedPass`."""
    return lambda shape, dtype: cls(directory, shape, dtype)


def _head_log_probs(features, kernel, bias, matmul_dtype):
  """log_softmax(features @ kernel + bias) in float32, the product's inputs in `matmul_dtype`.

  float32: TF's own matmul (oneDNN on CPU), then an XLA-fused softmax. bfloat16: the inputs rounded to
  bfloat16, the products accumulated and returned in float32, softmax fused, all in one XLA function:
  XLA's dot with a float32 result (`output_type`; faster than float32 on an AMD EPYC with AVX512_BF16,
  README "Scale"). TF's own bfloat16 matmul would round every logit to bfloat16 (8 significant bits: at
  |logit| ~ 10 and lambda 25 an error of ~1 in the exponent of the kernel; fewer labels agree with a
  float32 reference, benchmarks/imagenet_labelling.py).
  """
  if matmul_dtype == "bfloat16":
    return _bfloat16_log_probs(features, kernel, bias)
  return _log_softmax_with_bias(tf.matmul(tf.cast(features, tf.float32), kernel), bias)


@tf.function(jit_compile=True)
def _bfloat16_log_probs(features, kernel, bias):
  logits = tf.linalg.matmul(tf.cast(features, tf.bfloat16), tf.cast(kernel, tf.bfloat16),
                            output_type=tf.float32)
  return tf.nn.log_softmax(logits + bias[None, :], axis=1)


@tf.function(jit_compile=True)
def _log_softmax_with_bias(logits, bias):
  return tf.nn.log_softmax(tf.cast(logits, tf.float32) + bias[None, :], axis=1)


@tf.function(jit_compile=True)
def _nonfinite_count(values):
  """NaN/inf entries of `values` (int64), fused: no temporary of its size."""
  return tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(values)), tf.int64))


class LinearHeadLogProbs:
  """One linear head's log-probabilities, computed from stored features for any row range.

  Args:
    features: [N, D] (numpy, any float dtype including bfloat16; a tensor; or a `FeatureFile`).
    kernel: [D, K], bias: [K]: the head's weights.
    matmul_dtype: "float32" (exact given the stored features) or "bfloat16" (the kernel rounded to
      bfloat16 and the product accumulated in float32, on the hardware's bfloat16 units; the logits
      keep float32's precision given the rounded inputs).
    rows_per_read: the labeller reads at most this many rows at a time.

  `head[start:stop]` is a float32 tensor [stop - start, K]; `.shape` is (N, K).
  """

  def __init__(self, features, kernel, bias, *, matmul_dtype: str = "float32",
               rows_per_read: int = DEFAULT_ROWS_PER_READ, feature_check: Optional[dict] = None):
    if matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
    self.features = features
    self.kernel = tf.convert_to_tensor(kernel, tf.float32)
    self.bias = tf.convert_to_tensor(bias, tf.float32)
    if len(features.shape) != 2 or self.kernel.shape.rank != 2 or features.shape[1] != self.kernel.shape[0]:
      raise ValueError(f"LinearHeadLogProbs: features {tuple(features.shape)} and kernel "
                       f"{tuple(self.kernel.shape)} do not compose: need [N, D] and [D, K]")
    if tuple(self.bias.shape) != (self.kernel.shape[1],):
      raise ValueError(f"LinearHeadLogProbs: bias {tuple(self.bias.shape)} does not match the kernel's "
                       f"K={self.kernel.shape[1]}")
    self.shape = (int(features.shape[0]), int(self.kernel.shape[1]))
    self.rows_per_read = int(rows_per_read)
    self.matmul_dtype = matmul_dtype
    # The features' non-finite count, shared by the heads of one `LinearHeads` (counted once).
    self._feature_check = feature_check if feature_check is not None else {}

  def __getitem__(self, rows):
    start, stop = _row_range(rows, self.shape[0], "LinearHeadLogProbs")
    return _head_log_probs(tf.convert_to_tensor(self.features[start:stop]), self.kernel, self.bias,
                           self.matmul_dtype)

  def nonfinite_inputs(self) -> int:
    """NaN/inf entries among the features (counted once per feature array) and this head's weights."""
    if "count" not in self._feature_check:
      count = 0
      for start in range(0, self.shape[0], self.rows_per_read):
        count += int(_nonfinite_count(tf.convert_to_tensor(self.features[start:start + self.rows_per_read])))
      self._feature_check["count"] = count
    weights = int(_nonfinite_count(self.kernel)) + int(_nonfinite_count(self.bias))
    return self._feature_check["count"] + weights

  def label_log_probs(self, labels: np.ndarray) -> np.ndarray:
    """float32 [N], each example's log-probability of its label, read part by part."""
    out = np.empty(self.shape[0], np.float32)
    for start in range(0, self.shape[0], self.rows_per_read):
      stop = min(start + self.rows_per_read, self.shape[0])
      part = self[start:stop].numpy()
      out[start:stop] = part[np.arange(stop - start), labels[start:stop]]
    return out


@dataclasses.dataclass
class LinearHeads(Sequence):
  """T linear heads over one stored feature matrix: `heads[t]` is head t's `LinearHeadLogProbs`.

  Attributes:
    features: [N, D], the label pass's "features" vector of every example.
    kernels: T arrays [D, K_t]; biases: T arrays [K_t] (kept as the heads' float32 tensors).
    matmul_dtype, rows_per_read: as in `LinearHeadLogProbs`.
  """
  features: object
  kernels: Sequence
  biases: Sequence
  matmul_dtype: str = "float32"
  rows_per_read: int = DEFAULT_ROWS_PER_READ

  def __post_init__(self):
    if len(self.kernels) != len(self.biases) or not self.kernels:
      raise ValueError(f"LinearHeads: {len(self.kernels)} kernels and {len(self.biases)} biases; need one "
                       f"of each per head, at least one head")
    feature_check = {}
    self._heads = [LinearHeadLogProbs(self.features, k, b, matmul_dtype=self.matmul_dtype,
                                      rows_per_read=self.rows_per_read, feature_check=feature_check)
                   for k, b in zip(self.kernels, self.biases)]
    # The heads' float32 tensors, not the arrays given (numpy ones would be a second copy of the weights).
    self.kernels = [head.kernel for head in self._heads]
    self.biases = [head.bias for head in self._heads]

  def __len__(self):
    return len(self._heads)

  def __getitem__(self, t):
    return self._heads[t]

  @classmethod
  def of_model(cls, model, features, heads: Sequence[int], **kwargs) -> "LinearHeads":
    """The heads `heads` of `model` (anything with `linear_heads()` -> [(kernel, bias)] per head, as
    `SelaModel`) over `features`."""
    weights = model.linear_heads()
    return cls(features, [weights[t][0] for t in heads], [weights[t][1] for t in heads], **kwargs)

  def close(self):
    """Frees the features' disk space when they are a `FeatureFile` (does nothing otherwise)."""
    if isinstance(self.features, FeatureFile):
      self.features.close()



def per_replica_log_probs(strategy: tf.distribute.Strategy, per_replica_features, kernel, bias, *,
                          matmul_dtype: str = "float32"):
  """One head's log-probabilities on every replica from its shard of the features: distributed values
  [N_r, K] float32 (an input of `labeller.assign_labels_sharded`)."""
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
  kernel = tf.convert_to_tensor(kernel, tf.float32)
  bias = tf.convert_to_tensor(bias, tf.float32)
  return strategy.run(lambda f: _head_log_probs(f, kernel, bias, matmul_dtype), args=(per_replica_features,))


def store_bytes(num_examples: int, num_clusters: Sequence[int], feature_dim: int, store: str,
                feature_dtype: str = "bfloat16", kernel_dtype: str = "float32",
                features_in_file: bool = False) -> int:
  """Peak bytes of a labelling in the process's memory: what the label pass stores there plus the
  largest head's kernel (the formula of the module docstring; the parts read at a time and the runtime
  come on top). `features_in_file`: the features are in a `FeatureFile`, on disk, not in memory."""
  kernel = num_examples * max(num_clusters) * tf.as_dtype(kernel_dtype).size
  if store == "features":
    features = 0 if features_in_file else num_examples * feature_dim * tf.as_dtype(feature_dtype).size
    return features + kernel
  return num_examples * sum(num_clusters) * 4 + kernel
