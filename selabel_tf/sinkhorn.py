"""XLA kernels of the fast Sinkhorn-Knopp iteration (paper eq. 8, Cuturi 2013).

Layout and notation. One head's log-probabilities are `log_probs: [N, K]` (example-major, as a network
writes them). The paper's K x N matrix P^lam is kept as its transpose, re-centred (the "kernel"):

    power[n, k] = exp(lam * log_probs[n, k] - col_offset[n] - row_offset[k])        (in [0, 1])

so that Q = diag(alpha) P^lam diag(beta) = diag(r) power^T diag(c) with
log alpha = log r - row_offset and log beta = log c - col_offset.

Stability. Given the current log alpha (0 at a cold start), `col_offset[n] = max_k (lam log_probs[n, k] +
log alpha_k)` and `row_offset[k] = max_n (lam log_probs[n, k] + log alpha_k - col_offset[n]) - log alpha_k`.
Then every example and every cluster holds an entry exactly 1, so no row or column sum underflows,
whatever lam and however unlikely a cluster is. Entries far below 1 do underflow in float32 (at lam=25,
log-prob gaps over 3.5 nats); they only matter once the scalings r grow far apart, so when the spread
of log r exceeds `absorb_limit` the solver stops, the caller folds r into log alpha and rebuilds the
kernel around it ("absorption", Schmitzer 2019), and the iteration resumes from a uniform r. This is
what keeps float32 (and float16 storage) as exact as the float64 official code.

One iteration is the pair of half-steps of the official code, c = (1/N) / (power r), then
r = (1/K) / (power^T c). On CPU both half-steps are fused into one pass over blocks of rows sized for
the per-core L2 cache, so the matrix is streamed from memory once per iteration, not twice; the row
chunks run in parallel. On GPU/TPU each chunk is two bandwidth-bound matvecs.
"""

import math

import numpy as np
import tensorflow as tf

# Blocks of about this many bytes stay in a core's L2 cache between the two half-steps of an iteration.
_CPU_BLOCK_BYTES = 1 << 20
# P^lam is held as a tuple of row chunks of at most this size: it is built chunk by chunk without a
# second full-size copy, and on CPU the chunks are the units that run in parallel. A chunk's widened
# (compute-dtype) copy and its rebuilt twin are the labelling's transients beside the kernel, so the
# chunks are kept small (64 MiB: README "Scale" measures the peak and time against 256 MiB).
_CHUNK_BYTES = 1 << 26


def plan_chunks(num_examples, num_clusters, storage_dtype, device_type, rows_per_read=None):
  """How to hold and stream one head's P^lam on a device of `device_type` ('CPU', 'GPU', 'TPU').

  Every chunk has the same number of rows but the last, and, where the head is read in parts of at most
  `rows_per_read` rows, every chunk is read in equal parts. A pooling allocator (TF's on CPU and GPU)
  then finds a rebuilt chunk room of exactly its size where a chunk or two parts were freed; with sizes
  that differ by a row, two freed neighbours (just under twice a chunk) are taken whole by one chunk and
  half of them wasted (measured at ImageNet's shape: README "Scale").

  Returns:
    bounds: python ints [0, ..., N], the row ranges of the chunks.
    block_rows: rows per block of the fused pass (>= a chunk's rows means plain matvecs).
    part_rows: rows per part of a chunk's read (the chunk's rows when it is read whole).
  """
  itemsize = tf.as_dtype(storage_dtype).size
  num_chunks = math.ceil(num_examples * num_clusters * itemsize / _CHUNK_BYTES)
  if device_type == "CPU":
    block_rows = max(8, _CPU_BLOCK_BYTES // (num_clusters * itemsize))
    threads = tf.config.threading.get_intra_op_parallelism_threads() or _cpu_count()
    num_chunks = max(num_chunks, min(threads, num_examples // block_rows))
  else:
    block_rows = num_examples
  num_chunks = max(1, min(num_chunks, num_examples))
  chunk_rows = part_rows = math.ceil(num_examples / num_chunks)
  if rows_per_read is not None:
    parts = math.ceil(chunk_rows / max(1, int(rows_per_read)))
    part_rows = math.ceil(chunk_rows / parts)
    chunk_rows = part_rows * parts
  bounds = list(range(0, num_examples, chunk_rows)) + [num_examples]
  return bounds, block_rows, part_rows


def _cpu_count():
  import os  # pylint: disable=g-import-not-at-top
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@tf.function(jit_compile=True)
def kernel_stats(log_probs_chunk, lam, log_alpha):
  """Per-chunk statistics for the kernel's offsets.

  Args:
    log_probs_chunk: [n, K] in the compute dtype.
    lam: scalar.
    log_alpha: [K], the log alpha the kernel is centred on.

  Returns:
    col_offset: [n], max_k (lam log_probs + log alpha).
    row_max: [K], max over the chunk of lam log_probs + log alpha - col_offset (reduce with max across
      chunks; then row_offset = row_max - log alpha).
    num_nonfinite: int64 scalar, NaN/inf entries in the chunk.
  """
  finite = tf.math.is_finite(log_probs_chunk)
  num_nonfinite = tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.int64))
  scores = lam * tf.where(finite, log_probs_chunk, tf.zeros_like(log_probs_chunk)) + log_alpha[None, :]
  col_offset = tf.reduce_max(scores, axis=1)
  row_max = tf.reduce_max(scores - col_offset[:, None], axis=0)
  return col_offset, row_max, num_nonfinite


@tf.function(jit_compile=True)
def kernel_chunk(log_probs_chunk, lam, col_offset_chunk, row_offset, storage_dtype_probe):
  """exp(lam log_probs - col_offset - row_offset) for one chunk, in the dtype of the scalar probe."""
  x = lam * log_probs_chunk - col_offset_chunk[:, None] - row_offset[None, :]
  return tf.cast(tf.exp(x), storage_dtype_probe.dtype)


@tf.function(jit_compile=True)
def recentred_kernel_chunk(log_probs_chunk, lam, log_alpha, storage_dtype_probe):
  """One pass of a re-centring: the kernel with row_offset = -log alpha, for one chunk.

  Returns:
    kernel: [n, K], exp(lam log_probs + log alpha - col_offset) in the probe's dtype.
    col_offset: [n], max_k (lam log_probs + log alpha).
    row_max: [K], the chunk's largest kernel entry per cluster (to check that no row underflowed).
  """
  scores = lam * log_probs_chunk + log_alpha[None, :]
  col_offset = tf.reduce_max(scores, axis=1)
  kernel = tf.cast(tf.exp(scores - col_offset[:, None]), storage_dtype_probe.dtype)
  return kernel, col_offset, tf.reduce_max(tf.cast(kernel, log_probs_chunk.dtype), axis=0)


@tf.function(jit_compile=True)
def derived_kernel_chunk(power_chunk, row_offset, col_offset_chunk, ratio, log_alpha):
  """The kernel of lambda' = ratio * lambda centred on `log_alpha`, from the kernel of lambda alone.

  log power = lam log_probs - col_offset - row_offset, so lam' log_probs + log alpha =
  ratio (log power + col_offset + row_offset) + log alpha: a re-centring (ratio 1) or the next
  annealing stage without reading the log-probabilities again, for heads whose rows are expensive to
  compute. Entries that underflowed stay 0 (they are below e^-87 of their example's largest at
  float32's range, and only shrink as lambda grows); each derivation rounds the kernel once more.

  Args:
    power_chunk: [n, K] kernel in its storage dtype.
    row_offset: [K], col_offset_chunk: [n]: its offsets, in the compute dtype.
    ratio: lambda' / lambda.
    log_alpha: [K], the new centre (row_offset' = -log_alpha).

  Returns:
    (kernel' [n, K] in the storage dtype, col_offset' [n], row maxima [K] of kernel').
  """
  dtype = log_alpha.dtype
  log_power = tf.math.log(widen(power_chunk, dtype))
  scores = ratio * (log_power + row_offset[None, :]) + log_alpha[None, :]
  shift = tf.reduce_max(scores, axis=1)
  shift = tf.where(tf.math.is_finite(shift), shift, tf.zeros_like(shift))  # a row that underflowed whole
  kernel = tf.cast(tf.exp(scores - shift[:, None]), power_chunk.dtype)
  return kernel, ratio * col_offset_chunk + shift, tf.reduce_max(tf.cast(kernel, dtype), axis=0)


def fused_pass(power, row_scale, inv_num_examples, block_rows):
  """One Sinkhorn iteration's reads of `power`: the column half-step and the row sums it feeds.

  Traced inside an XLA function; `block_rows` is a python int. The chunks are independent, so XLA
  runs them in parallel on CPU. The column scale c itself is not kept (only its contribution to the
  row sums), so nothing [N]-sized is written per iteration; `column_scale` recomputes it at the end.

  Args:
    power: tuple of [n_i, K] chunks of the kernel (rows = examples) in the storage dtype.
    row_scale: [K] current r, in the compute dtype.
    inv_num_examples: scalar 1/N_total (N_total counts every shard).
    block_rows: rows per block; a chunk with at most this many rows is done by two plain matvecs.

  Returns:
    row_sums: [K], power^T c with c = (1/N_total) / (power r) (this shard's share).
  """
  dtype = row_scale.dtype

  def block_row_sums(block, weight=None):
    col_scale = _column_half_step(block, row_scale, inv_num_examples)
    if weight is not None:
      col_scale = tf.where(weight, col_scale, tf.zeros_like(col_scale))
    return tf.linalg.matvec(block, col_scale, transpose_a=True)

  row_sums = []
  for chunk in power:
    chunk_rows, num_clusters = chunk.shape
    if block_rows >= chunk_rows:
      row_sums.append(block_row_sums(widen(chunk, dtype)))
      continue

    def body(j, acc, chunk=chunk, chunk_rows=chunk_rows, num_clusters=num_clusters):
      # The last block is moved back to end at the chunk's end; rows it shares with the block before
      # are counted once.
      offset = tf.minimum(j * block_rows, chunk_rows - block_rows)
      block = widen(tf.slice(chunk, [offset, 0], [block_rows, num_clusters]), dtype)
      fresh = tf.range(block_rows) + offset >= j * block_rows
      return j + 1, acc + block_row_sums(block, fresh)

    num_blocks = math.ceil(chunk_rows / block_rows)
    _, acc = tf.while_loop(lambda j, _: j < num_blocks, body,
                           (tf.constant(0), tf.zeros([num_clusters], dtype)))
    row_sums.append(acc)
  return tf.add_n(row_sums)


def as_bits(power):
  """The kernel's chunks with bfloat16 ones viewed as uint16 (a TF bitcast, outside XLA: no copy).

  Inside an XLA loop a plain convert of a slice of a bfloat16 chunk became a slice of the converted
  chunk, hoisted out of the loop: a float32 copy of the whole kernel (4.8 GB more for a 2.2 GB
  kernel); and XLA's own bitcast of a whole chunk copies it (2.2 GB more). Sliced as uint16 and
  widened by `widen`, nothing kernel-sized is made."""
  return tuple(tf.bitcast(chunk, tf.uint16) if chunk.dtype == tf.bfloat16 else chunk for chunk in power)


def widen(block, dtype):
  """`block` cast to the compute dtype `dtype`; bfloat16 (or its uint16 bits, see `as_bits`) by its
  bits: a bfloat16 is the top half of a float32."""
  if block.dtype == tf.bfloat16:
    block = tf.bitcast(block, tf.uint16)
  if block.dtype != tf.uint16:
    return tf.cast(block, dtype)
  bits = tf.cast(block, tf.uint32)
  return tf.cast(tf.bitcast(tf.bitwise.left_shift(bits, tf.constant(16, tf.uint32)), tf.float32), dtype)


def _column_half_step(block, row_scale, inv_num_examples):
  tiny = tf.constant(np.finfo(row_scale.dtype.as_numpy_dtype).tiny, row_scale.dtype)
  return inv_num_examples / tf.maximum(tf.linalg.matvec(block, row_scale), tiny)


def column_scale(power, row_scale, inv_num_examples):
  """c = (1/N_total) / (power r) over the chunks of `power`: [N].

  One XLA call per chunk: a narrow-stored chunk is widened to the compute dtype for the matvec, and
  only one chunk's widened copy exists at a time (not a second kernel's worth).
  """
  return tf.concat([_chunk_column_scale(chunk, row_scale, inv_num_examples) for chunk in power], 0)


@tf.function(jit_compile=True)
def _chunk_column_scale(chunk, row_scale, inv_num_examples):
  return _column_half_step(tf.cast(chunk, row_scale.dtype), row_scale, inv_num_examples)


def row_marginal_error(row_scale, row_sums):
  """max_k |K * r_k * (power^T c)_k - 1|: the largest relative deviation of a cluster's mass from 1/K.

  With c just computed from r, every example's mass is exactly 1/N; this is how far the clusters are
  from equipartition, i.e. the marginal error of Q = diag(r) power^T diag(c).
  """
  num_clusters = tf.cast(tf.shape(row_scale)[0], row_scale.dtype)
  return tf.reduce_max(tf.abs(num_clusters * row_scale * row_sums - 1))


def over_relaxed_row_step(row_scale, sinkhorn_row_scale, omega):
  """r^(1 - omega) * r_sk^omega: the over-relaxed row half-step (Thibault et al. 2017, "Overrelaxed
  Sinkhorn-Knopp"). omega = 1 is the plain step r_sk; 1 < omega < 2 keeps the same fixed point (the
  solution of eq. 8) and, on the slowly converging problems of large lambda, needs far fewer
  iterations. The column half-step stays exact, so every example's mass is still 1/N."""
  dtype = row_scale.dtype
  tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)
  # In logs: the ratio r_sk / r raised to omega could overflow where the result does not.
  log_r = (1 - omega) * tf.math.log(row_scale) + omega * tf.math.log(sinkhorn_row_scale)
  return tf.maximum(tf.exp(log_r), tiny)


def log_spread(row_scale):
  """max_k log r_k - min_k log r_k (inf once some r_k is 0)."""
  log_r = tf.math.log(row_scale)
  return tf.reduce_max(log_r) - tf.reduce_min(log_r)


def iterations(row_sums, row_scale, max_iters, tol, absorb_limit, omega):
  """The Sinkhorn-Knopp iteration of eq. 8 and its stopping rule: the one place they are written.

  Traced inside a `tf.function` (with XLA on one device; without, where `row_sums` all-reduces across
  replicas). One iteration is the column half-step (inside `row_sums`), the marginal error of the Q it
  gives, and the over-relaxed row half-step. It runs up to `max_iters` iterations from `row_scale` and
  stops once the marginal error <= tol, or once the spread of log r exceeds `absorb_limit` (the caller
  then re-centres the kernel).

  Args:
    row_sums: `r -> power^T c` with c = (1/N) / (power r): [K] -> [K], over every example.
    row_scale: [K], r to start from, in the compute dtype.
    max_iters: int32 scalar.
    tol, absorb_limit, omega: scalars in the compute dtype (omega: over-relaxation, 1 is plain
      Sinkhorn-Knopp).

  Returns:
    used: [K], the last r whose column half-step was taken; the returned error is that of
      Q = diag(used) power^T diag(column_scale(power, used)).
    next_row_scale: [K], r after one more row half-step (where to continue from).
    iterations: int32, iterations run.
    error: the marginal error of that Q.
  """
  dtype = row_scale.dtype
  inv_k = tf.constant(1.0 / int(row_scale.shape[0]), dtype)
  tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)

  def body(it, r, used, err):
    del used, err
    sums = row_sums(r)
    err = row_marginal_error(r, sums)
    return it + 1, over_relaxed_row_step(r, inv_k / tf.maximum(sums, tiny), omega), r, err

  def cond(it, r, used, err):
    del used
    return tf.logical_and(tf.logical_and(it < max_iters, err > tol),
                          tf.logical_or(it == 0, log_spread(r) <= absorb_limit))

  init = (tf.constant(0), row_scale, row_scale, tf.constant(np.inf, dtype))
  it, next_row_scale, used, err = tf.while_loop(cond, body, init)
  return used, next_row_scale, it, err


def make_solver(block_rows):
  """`iterations` over a tuple of kernel chunks on one device, XLA-compiled (one compile per shape
  and dtype): `(power, row_scale, max_iters, tol, absorb_limit, omega) -> (used, next_row_scale,
  iterations, error)`."""

  @tf.function(jit_compile=True)
  def solve_bits(power, row_scale, max_iters, tol, absorb_limit, omega):
    num_examples = sum(int(chunk.shape[0]) for chunk in power)
    inv_n = tf.constant(1.0 / num_examples, row_scale.dtype)
    return iterations(lambda r: fused_pass(power, r, inv_n, block_rows), row_scale, max_iters, tol,
                      absorb_limit, omega)

  def solve(power, row_scale, max_iters, tol, absorb_limit, omega):
    return solve_bits(as_bits(power), row_scale, max_iters, tol, absorb_limit, omega)

  return solve


def make_pass(block_rows):
  """An XLA-compiled single fused pass, for the sharded solver (one all-reduce of [K] per call)."""

  @tf.function(jit_compile=True)
  def one_pass(power, row_scale, inv_num_examples):
    return fused_pass(power, row_scale, inv_num_examples, block_rows)

  return one_pass


def argmax_labels(power, row_scale):
  """argmax_k of Q[n, k] = r_k power[n, k] c_n over the chunks of `power`: int64 [N] (one XLA call per
  chunk, as `column_scale`)."""
  return tf.concat([_chunk_argmax(chunk, row_scale) for chunk in power], 0)


@tf.function(jit_compile=True)
def _chunk_argmax(chunk, row_scale):
  return tf.argmax(tf.cast(chunk, row_scale.dtype) * row_scale[None, :], axis=1)


@tf.function(jit_compile=True)
def top_clusters(chunk, row_scale, m):
  """int32 [n, m]: each example's m clusters of largest Q[n, k] (r_k power[n, k])."""
  return tf.math.top_k(widen(chunk, row_scale.dtype) * row_scale[None, :], k=m).indices


def sample_labels(power, row_scale, key):
  """Labels drawn from q(k|n), proportional to r_k power[n, k] for each example n: int64 [N].

  Inverse-CDF sampling with one uniform number per example (stateless, chunk c seeded by
  `fold_in(key, c)`), one XLA call per chunk. The cluster sizes are then N/K in expectation, however
  flat Q is, where the argmax of a nearly flat Q can put most examples in one cluster.

  Args:
    power: the kernel's row chunks (as `argmax_labels`).
    row_scale: float [K], r.
    key: int64 [2], the stateless seed.
  """
  key = tf.cast(key, tf.int64)
  return tf.concat([_chunk_sample(chunk, row_scale, tf.random.experimental.stateless_fold_in(key, c))
                    for c, chunk in enumerate(power)], 0)


@tf.function(jit_compile=True)
def _chunk_sample(chunk, row_scale, key):
  cumulative = tf.math.cumsum(tf.cast(chunk, row_scale.dtype) * row_scale[None, :], axis=1)
  threshold = tf.random.stateless_uniform(tf.shape(chunk)[:1], key, dtype=row_scale.dtype)
  threshold *= cumulative[:, -1]
  # The first k whose cumulative mass reaches the threshold (clipped against round-off at the end).
  label = tf.reduce_sum(tf.cast(cumulative < threshold[:, None], tf.int64), axis=1)
  return tf.minimum(label, tf.cast(tf.shape(chunk)[1] - 1, tf.int64))


@tf.function
def conditional_log_q(power_chunk, row_scale, col_scale_chunk, num_examples):
  """log q(k|n) = log(N Q[n, k]) for a chunk of examples: [n, K] (each row's exp sums to 1)."""
  dtype = row_scale.dtype
  return (tf.math.log(tf.cast(power_chunk, dtype)) + tf.math.log(row_scale)[None, :]
          + tf.math.log(col_scale_chunk * tf.cast(num_examples, dtype))[:, None])
