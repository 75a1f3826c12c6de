"""XLA kernels of the fast Sinkhorn-Knopp iteration (paper eq. 8, Cuturi 2013).

Layout and notation. One head's log-probabilities are `log_probs: [N, K]` (example-major, as a network
writes them). The paper's K x N matrix P^lam is kept here as its transpose

    power[n, k] = exp(lam * (log_probs[n, k] - col_shift[n] - row_shift[k]))        (in (0, 1])

with `col_shift[n] = max_k log_probs[n, k]` and `row_shift[k] = max_n (log_probs[n, k] - col_shift[n])`.
After both shifts every example (column of the paper's matrix) and every cluster (row) holds an entry
exactly 1, so no row or column sum can underflow, whatever lam and however unlikely a cluster is. The
shifts are absorbed into the scalings: with `row_scale` (r, paper's alpha up to the shift) and
`col_scale` (c, beta up to the shift),

    Q = diag(alpha) P^lam diag(beta),  log alpha = log r - lam * row_shift,  log beta = log c - lam * col_shift.

One iteration is the pair of half-steps of the official code, c = (1/N) / (power r), then
r = (1/K) / (power^T c). On CPU both half-steps are fused into one pass over blocks of rows sized for
the per-core L2 cache, so the matrix is streamed from memory once per iteration, not twice; independent
parts of the rows run in parallel. On GPU/TPU one block covers all rows (two bandwidth-bound matvecs).
"""

import math

import numpy as np
import tensorflow as tf

# Blocks of about this many bytes stay in a core's L2 cache between the two half-steps of an iteration.
_CPU_BLOCK_BYTES = 1 << 20


def default_blocking(num_examples, num_clusters, storage_dtype, device_type):
  """Block rows and parallel parts for the fused pass on `device_type` ('CPU', 'GPU', 'TPU').

  Returns:
    (block_rows, num_parts): python ints; block_rows == num_examples means one unfused block.
  """
  if device_type != "CPU":
    return num_examples, 1
  itemsize = tf.as_dtype(storage_dtype).size
  block_rows = max(8, _CPU_BLOCK_BYTES // (num_clusters * itemsize))
  threads = tf.config.threading.get_intra_op_parallelism_threads() or _cpu_count()
  num_parts = max(1, min(threads, num_examples // block_rows))
  return min(block_rows, num_examples), num_parts


def _cpu_count():
  import os  # pylint: disable=g-import-not-at-top
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@tf.function(jit_compile=True, reduce_retracing=True)
def shift_stats(log_probs_chunk):
  """Per-chunk statistics for the two shifts.

  Args:
    log_probs_chunk: float [n, K].

  Returns:
    col_shift: [n], each example's max log-prob.
    row_max: [K], max over the chunk of log_probs - col_shift (reduce with max across chunks).
    num_nonfinite: int64 scalar, NaN/inf entries in the chunk.
  """
  finite = tf.math.is_finite(log_probs_chunk)
  num_nonfinite = tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.int64))
  safe = tf.where(finite, log_probs_chunk, tf.zeros_like(log_probs_chunk))
  col_shift = tf.reduce_max(safe, axis=1)
  row_max = tf.reduce_max(safe - col_shift[:, None], axis=0)
  return col_shift, row_max, num_nonfinite


@tf.function(jit_compile=True, reduce_retracing=True)
def shifted_power(log_probs_chunk, col_shift_chunk, row_shift, lam, storage_dtype_probe):
  """exp(lam * (log_probs - col_shift - row_shift)) for one chunk, cast like `storage_dtype_probe`.

  Entries lie in [0, 1]; `storage_dtype_probe` is a scalar of the storage dtype (it carries the dtype
  through tracing).
  """
  compute_dtype = col_shift_chunk.dtype
  x = tf.cast(log_probs_chunk, compute_dtype) - col_shift_chunk[:, None] - row_shift[None, :]
  return tf.cast(tf.exp(lam * x), storage_dtype_probe.dtype)


def fused_pass(power, row_scale, inv_num_examples, block_rows, num_parts):
  """One Sinkhorn iteration's reads of `power`: the column half-step and the row sums it feeds.

  Traced inside an XLA function. `block_rows` and `num_parts` are python ints.

  Args:
    power: [N, K] in the storage dtype (float32, float16, bfloat16 or float64).
    row_scale: [K] current r, in the compute dtype.
    inv_num_examples: scalar 1/N_total (N_total counts every shard).
    block_rows: rows per block; >= N means a single unfused block.
    num_parts: contiguous parts of the rows processed independently (in parallel on CPU).

  Returns:
    col_scale: [N], c = (1/N_total) / (power r).
    row_sums: [K], power^T c (this shard's share of the next row half-step).
  """
  num_examples, num_clusters = power.shape
  dtype = row_scale.dtype
  tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)

  def column_half_step(block):
    return inv_num_examples / tf.maximum(tf.linalg.matvec(block, row_scale), tiny)

  if block_rows >= num_examples:
    full = tf.cast(power, dtype)
    col_scale = column_half_step(full)
    return col_scale, tf.linalg.matvec(full, col_scale, transpose_a=True)

  bounds = np.linspace(0, num_examples, num_parts + 1).astype(np.int64)
  col_parts, row_sums = [], []
  for start, stop in zip(bounds[:-1], bounds[1:]):
    part_rows = int(stop - start)
    rows = min(block_rows, part_rows)
    num_blocks = math.ceil(part_rows / rows)
    start = int(start)

    def body(j, col_part, acc, start=start, part_rows=part_rows, rows=rows):
      # The last block is moved back to end at the part's end; rows it shares with the block before
      # are recomputed identically and counted once.
      offset = tf.minimum(j * rows, part_rows - rows)
      block = tf.cast(tf.slice(power, [start + offset, 0], [rows, num_clusters]), dtype)
      block_col = column_half_step(block)
      fresh = tf.range(rows) + offset >= j * rows
      counted = tf.where(fresh, block_col, tf.zeros_like(block_col))
      acc += tf.linalg.matvec(block, counted, transpose_a=True)
      col_part = tf.tensor_scatter_nd_update(col_part, (tf.range(rows) + offset)[:, None], block_col)
      return j + 1, col_part, acc

    _, col_part, acc = tf.while_loop(
        lambda j, *_: j < num_blocks, body,
        (tf.constant(0), tf.zeros([part_rows], dtype), tf.zeros([num_clusters], dtype)))
    col_parts.append(col_part)
    row_sums.append(acc)
  return tf.concat(col_parts, 0), tf.add_n(row_sums)


def row_marginal_error(row_scale, row_sums):
  """max_k |K * r_k * (power^T c)_k - 1|: the largest relative deviation of a cluster's mass from 1/K.

  With c just computed from r, every example's mass is exactly 1/N; this is how far the clusters are
  from equipartition, i.e. the marginal error of Q = diag(r) power^T diag(c).
  """
  num_clusters = tf.cast(tf.shape(row_scale)[0], row_scale.dtype)
  return tf.reduce_max(tf.abs(num_clusters * row_scale * row_sums - 1))


def make_solver(block_rows, num_parts):
  """An XLA-compiled single-device solver for a given blocking (one compile per shape and dtype)."""

  @tf.function(jit_compile=True, reduce_retracing=True)
  def solve(power, row_scale, max_iters, tol):
    """Runs up to `max_iters` iterations from `row_scale`, stopping once the marginal error <= tol.

    Returns:
      used: [K], the r that produced col_scale (with it, the returned error holds exactly).
      next_row_scale: [K], r after one more row half-step (where to continue from).
      col_scale: [N].
      iterations: int32, iterations run.
      error: marginal error of Q = diag(used) power^T diag(col_scale).
    """
    dtype = row_scale.dtype
    inv_n = tf.constant(1.0, dtype) / tf.cast(tf.shape(power)[0], dtype)
    inv_k = tf.constant(1.0, dtype) / tf.cast(tf.shape(power)[1], dtype)
    tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)

    def body(it, r, used, c, err):
      del used, c, err
      c, row_sums = fused_pass(power, r, inv_n, block_rows, num_parts)
      err = row_marginal_error(r, row_sums)
      return it + 1, inv_k / tf.maximum(row_sums, tiny), r, c, err

    def cond(it, r, used, c, err):
      del r, used, c
      return tf.logical_and(it < max_iters, err > tol)

    num_examples = tf.shape(power)[0]
    init = (tf.constant(0), row_scale, row_scale, tf.zeros([num_examples], dtype),
            tf.constant(np.inf, dtype))
    it, next_row_scale, used, c, err = tf.while_loop(cond, body, init)
    return used, next_row_scale, c, it, err

  return solve


def make_pass(block_rows, num_parts):
  """An XLA-compiled single fused pass, for the sharded solver (one all-reduce of [K] per call)."""

  @tf.function(jit_compile=True, reduce_retracing=True)
  def one_pass(power, row_scale, inv_num_examples):
    return fused_pass(power, row_scale, inv_num_examples, block_rows, num_parts)

  return one_pass


@tf.function(jit_compile=True, reduce_retracing=True)
def argmax_labels(power_chunk, row_scale):
  """argmax_k of Q[n, k] = r_k power[n, k] c_n, for a chunk of examples: int64 [n]."""
  return tf.argmax(tf.cast(power_chunk, row_scale.dtype) * row_scale[None, :], axis=1)


@tf.function(jit_compile=True, reduce_retracing=True)
def conditional_log_q(power_chunk, row_scale, col_scale_chunk, num_examples):
  """log q(k|n) = log(N Q[n, k]) for a chunk of examples: [n, K] (each row's exp sums to 1)."""
  dtype = row_scale.dtype
  return (tf.math.log(tf.cast(power_chunk, dtype)) + tf.math.log(row_scale)[None, :]
          + tf.math.log(col_scale_chunk * tf.cast(num_examples, dtype))[:, None])
