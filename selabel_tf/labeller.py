"""Self-labelling: equipartitioned pseudo-labels from stored log-probabilities (paper eqs. 6-8).

`assign_labels` solves, per head, the entropy-regularised transport problem of eq. 7 by the fast
Sinkhorn-Knopp iteration of eq. 8, Q = diag(alpha) P^lam diag(beta), and returns the argmax of Q per
example (or, with `balance="exact"`, a rounding of Q in which every cluster gets floor(N/K) or ceil(N/K)
examples). `assign_labels_sharded` does the same when each replica of a `tf.distribute` strategy holds a
slice of the examples; only [K]-vectors cross replicas per iteration.

Stopping criterion. After the column half-step every example carries exactly mass 1/N, so the only
violated constraint is the cluster marginal. The iteration stops once

    marginal_error = max_k |K * sum_n Q[n, k] - 1| <= tol,

i.e. every cluster's (soft) size is within a fraction `tol` of N/K. Unlike the official code's
sum_n |c/c_new - 1| < 0.1, it does not grow with N, it is checked every iteration at no extra cost, and it
says directly how unbalanced the solution still is. The default `tol` comes from
`benchmarks/sinkhorn.py`, which measures how many argmax labels differ from a fully converged solution
at each tolerance.

Precision. Computation is float32 by default and stays finite for any finite input (see
`selabel_tf.sinkhorn` for the shifts that make it so); `dtype="float64"` runs the whole solve in
float64. `storage_dtype` may store P^lam narrower (float16/bfloat16, halving the memory read per
iteration) while accumulating in `dtype`.
"""

import dataclasses
import logging
import math
from typing import Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from selabel_tf import equipartition
from selabel_tf import sinkhorn

logger = logging.getLogger(__name__)

DEFAULT_TOL = 1e-2
DEFAULT_MAX_ITERS = 2000
BALANCE_MODES = ("argmax", "exact")
_CHUNK_BYTES = 1 << 26  # log-probs are read and converted in chunks of about 64 MiB
_CANDIDATES = 8  # clusters per example kept for the exact-equipartition rounding


@dataclasses.dataclass(frozen=True)
class LabelAssignment:
  """The result of self-labelling, per head t.

  Attributes:
    labels: int64 [T, N], the hard labels.
    log_row_scale: tuple of float64 [K_t], log alpha of eq. 8 (log domain: alpha overflows float32
      for unlikely clusters). Pass the whole assignment as `warm_start` to continue from it.
    log_col_scale: tuple of float64 [N], log beta of eq. 8. With them,
      Q[n, k] = exp(log_row_scale[k] + lam * log_probs[n, k] + log_col_scale[n]) and sum(Q) = 1.
    iterations: int [T], Sinkhorn iterations run.
    marginal_error: float [T], max_k |K sum_n Q[n, k] - 1| of the returned scalings.
    tol: the tolerance asked for.
  """
  labels: np.ndarray
  log_row_scale: tuple
  log_col_scale: tuple
  iterations: np.ndarray
  marginal_error: np.ndarray
  tol: float

  @property
  def converged(self) -> np.ndarray:
    return self.marginal_error <= self.tol

  def cluster_sizes(self, head: int = 0) -> np.ndarray:
    return np.bincount(self.labels[head], minlength=self.log_row_scale[head].shape[0])


LogProbs = Union[np.ndarray, tf.Tensor, Sequence[Union[np.ndarray, tf.Tensor]]]


def assign_labels(log_probs: LogProbs,
                  lam: float,
                  *,
                  tol: float = DEFAULT_TOL,
                  max_iters: int = DEFAULT_MAX_ITERS,
                  warm_start: Union[None, LabelAssignment, Sequence[np.ndarray]] = None,
                  balance: str = "argmax",
                  dtype: str = "float32",
                  storage_dtype: Optional[str] = None,
                  log_every: int = 100) -> LabelAssignment:
  """Assigns equipartitioned labels by Sinkhorn-Knopp, per head, on the current device.

  Args:
    log_probs: float [T, N, K] (numpy or tensor), or a sequence of T arrays [N, K_t] when heads differ
      in K. Log-probabilities from the network (logits work too: a per-example shift is absorbed into
      beta). Read in chunks; any object with `.shape` and row slicing works.
    lam: lambda of eq. 7 (> 0); larger is closer to the exact transport problem and slower.
    tol: stop once every cluster's soft size is within this fraction of N/K.
    max_iters: at most this many iterations per head.
    warm_start: a previous `LabelAssignment`, or a sequence of T log alpha vectors [K_t]
      (paper sec. 3.1: alpha and beta can be retained between steps).
    balance: "argmax" (the paper: argmax of Q) or "exact" (cluster sizes floor(N/K) or ceil(N/K)).
    dtype: "float32" or "float64", the precision of the iteration.
    storage_dtype: dtype of the stored P^lam; defaults to `dtype`. "float16"/"bfloat16" halve the bytes
      read per iteration.
    log_every: log progress (and check for a stop) every this many iterations.

  Returns:
    A `LabelAssignment`.

  Raises:
    ValueError: on NaN/inf in `log_probs` (before any work, naming the head and count), a bad shape,
      lam <= 0, N < K, or an option outside its allowed values.
  """
  heads = _as_heads(log_probs)
  dtype, storage_dtype = _check_options(lam, tol, max_iters, balance, dtype, storage_dtype, log_every)
  init_log_alpha = _warm_start_vectors(warm_start, heads)

  # Pass 1 over every head before any solving, so bad input fails fast and names the head.
  shifts = []
  for t, head in enumerate(heads):
    col_shift, row_shift, nonfinite = _shift_statistics(head, dtype)
    if nonfinite:
      raise ValueError(f"log_probs head {t} has {nonfinite} non-finite entries (NaN or inf) among "
                       f"{head.shape[0] * head.shape[1]}; self-labelling needs finite log-probabilities")
    shifts.append((col_shift, row_shift))

  results = []
  for t, (head, (col_shift, row_shift)) in enumerate(zip(heads, shifts)):
    num_examples, num_clusters = head.shape
    power = _power_matrix(head, col_shift, row_shift, lam, dtype, storage_dtype)
    row_scale = _initial_row_scale(init_log_alpha[t], row_shift, lam, num_clusters, dtype)
    row_scale, col_scale, iterations, error = _solve(power, row_scale, tol, max_iters, log_every,
                                                     f"head {t + 1}/{len(heads)}")
    if balance == "argmax":
      labels = sinkhorn.argmax_labels(power, row_scale).numpy()
    else:
      labels = _exact_equipartition(power, row_scale, col_scale)
    log_alpha = np.log(row_scale.numpy().astype(np.float64)) - lam * row_shift.numpy()
    log_beta = np.log(col_scale.numpy().astype(np.float64)) - lam * col_shift.numpy()
    results.append((labels, log_alpha, log_beta, iterations, error))
    del power

  labels, log_alpha, log_beta, iterations, errors = zip(*results)
  return LabelAssignment(labels=np.stack(labels).astype(np.int64), log_row_scale=tuple(log_alpha),
                         log_col_scale=tuple(log_beta), iterations=np.asarray(iterations),
                         marginal_error=np.asarray(errors, np.float64), tol=tol)


def assign_labels_sharded(strategy: tf.distribute.Strategy,
                          per_replica_log_probs,
                          lam: float,
                          *,
                          tol: float = DEFAULT_TOL,
                          max_iters: int = DEFAULT_MAX_ITERS,
                          warm_start: Union[None, LabelAssignment, Sequence[np.ndarray]] = None,
                          dtype: str = "float32",
                          storage_dtype: Optional[str] = None,
                          log_every: int = 100) -> LabelAssignment:
  """`assign_labels` with the examples sharded over the replicas of `strategy`.

  Each replica keeps its slice of the columns of P^lam on its own device; per iteration only the [K]
  row sums are all-reduced (`strategy.reduce`), so this scales to several devices and workers. Call it
  in cross-replica context (e.g. from a Keras callback), not inside `strategy.run`.

  Args:
    strategy: the `tf.distribute.Strategy` holding the shards.
    per_replica_log_probs: distributed values whose per-replica value is a tuple of T tensors
      [N_r, K_t] (or one tensor [T, N_r, K]): replica r's slice of the examples, in replica order.
    lam, tol, max_iters, warm_start, dtype, storage_dtype, log_every: as in `assign_labels`.

  Returns:
    A `LabelAssignment` over all N examples, concatenated in replica order (exact equipartition
    rounding is not available sharded: the argmax of Q is returned).
  """
  dtype, storage_dtype = _check_options(lam, tol, max_iters, "argmax", dtype, storage_dtype, log_every)
  local = strategy.experimental_local_results(per_replica_log_probs)
  num_heads = len(_as_heads(local[0]))
  head_shapes = [h.shape for h in _as_heads(local[0])]
  init_log_alpha = _warm_start_vectors(warm_start, head_shapes)
  lam_t = tf.constant(lam, dtype)
  probe = tf.zeros([], storage_dtype)

  def replica_head(values, t):
    return _as_heads(values)[t]

  results = []
  for t in range(num_heads):
    stats = strategy.run(lambda v, t=t: sinkhorn.shift_stats(tf.cast(replica_head(v, t), dtype)),
                         args=(per_replica_log_probs,))
    col_shift, row_max, nonfinite = stats
    num_nonfinite = int(strategy.reduce(tf.distribute.ReduceOp.SUM, nonfinite, axis=None))
    if num_nonfinite:
      raise ValueError(f"log_probs head {t} has {num_nonfinite} non-finite entries (NaN or inf); "
                       "self-labelling needs finite log-probabilities")
    row_shift = tf.reduce_max(strategy.gather(
        strategy.run(lambda m: m[None, :], args=(row_max,)), axis=0), axis=0)
    num_examples = int(strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(
        lambda v, t=t: tf.shape(replica_head(v, t), out_type=tf.int64)[0],
        args=(per_replica_log_probs,)), axis=None))
    num_clusters = int(row_shift.shape[0])
    _check_sizes(num_examples, num_clusters, t)
    power = strategy.run(
        lambda v, a, t=t: sinkhorn.shifted_power(replica_head(v, t), a, row_shift, lam_t, probe),
        args=(per_replica_log_probs, col_shift))
    blocking = [sinkhorn.default_blocking(int(p.shape[0]), num_clusters, storage_dtype, _device_type(p))
                for p in strategy.experimental_local_results(power)]
    one_pass = _pass_for(*blocking[0])

    row_scale = _initial_row_scale(init_log_alpha[t], row_shift, lam, num_clusters, dtype)
    inv_n = tf.constant(1.0 / num_examples, dtype)
    inv_k = 1.0 / num_clusters
    error = math.inf
    for iteration in range(1, max_iters + 1):
      col_scale, row_sums = strategy.run(one_pass, args=(power, row_scale, inv_n))
      total = strategy.reduce(tf.distribute.ReduceOp.SUM, row_sums, axis=None)
      error = float(sinkhorn.row_marginal_error(row_scale, total))
      if error <= tol or iteration == max_iters:
        break
      row_scale = inv_k / tf.maximum(total, np.finfo(dtype).tiny)
      if iteration % log_every == 0:
        logger.info("sharded head %d/%d: iteration %d, marginal error %.3g", t + 1, num_heads,
                    iteration, error)
    labels = strategy.gather(strategy.run(sinkhorn.argmax_labels, args=(power, row_scale)), axis=0)
    col_scale = strategy.gather(col_scale, axis=0)
    col_shift = strategy.gather(col_shift, axis=0)
    log_alpha = np.log(row_scale.numpy().astype(np.float64)) - lam * row_shift.numpy()
    log_beta = np.log(col_scale.numpy().astype(np.float64)) - lam * col_shift.numpy()
    results.append((labels.numpy(), log_alpha, log_beta, iteration, error))

  labels, log_alpha, log_beta, iterations, errors = zip(*results)
  return LabelAssignment(labels=np.stack(labels).astype(np.int64), log_row_scale=tuple(log_alpha),
                         log_col_scale=tuple(log_beta), iterations=np.asarray(iterations),
                         marginal_error=np.asarray(errors, np.float64), tol=tol)


def _as_heads(log_probs):
  """The heads as a list of [N, K_t] array-likes, checked for rank and a common N."""
  if isinstance(log_probs, (list, tuple)):
    heads = list(log_probs)
    if not heads:
      raise ValueError("log_probs: got an empty list of heads; expected T >= 1 arrays [N, K_t]")
    heads = [h if hasattr(h, "shape") else np.asarray(h) for h in heads]
    for t, head in enumerate(heads):
      if len(head.shape) != 2:
        raise ValueError(f"log_probs head {t}: expected shape [N, K], got {tuple(head.shape)}")
  else:
    if not hasattr(log_probs, "shape"):
      log_probs = np.asarray(log_probs)
    if len(log_probs.shape) != 3:
      raise ValueError(f"log_probs: expected [T, N, K] or a list of [N, K_t], got shape "
                       f"{tuple(log_probs.shape)}; wrap a single head as [log_probs]")
    heads = [log_probs[t] for t in range(log_probs.shape[0])]
  num_examples = {int(h.shape[0]) for h in heads}
  if len(num_examples) != 1:
    raise ValueError(f"log_probs: every head needs the same number of examples N, got "
                     f"{[int(h.shape[0]) for h in heads]}")
  for t, head in enumerate(heads):
    _check_sizes(int(head.shape[0]), int(head.shape[1]), t)
  return heads


def _check_sizes(num_examples, num_clusters, head):
  if num_clusters < 1:
    raise ValueError(f"log_probs head {head}: needs at least 1 cluster, got K={num_clusters}")
  if num_examples < num_clusters:
    raise ValueError(f"log_probs head {head}: N={num_examples} examples cannot be split equally among "
                     f"K={num_clusters} clusters; need N >= K")


def _check_options(lam, tol, max_iters, balance, dtype, storage_dtype, log_every):
  if not (isinstance(lam, (int, float, np.floating)) and math.isfinite(lam) and lam > 0):
    raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
  if not (isinstance(tol, (int, float, np.floating)) and tol > 0):
    raise ValueError(f"tol must be > 0, got {tol!r}")
  if not (isinstance(max_iters, (int, np.integer)) and max_iters >= 1):
    raise ValueError(f"max_iters must be an integer >= 1, got {max_iters!r}")
  if not (isinstance(log_every, (int, np.integer)) and log_every >= 1):
    raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
  if balance not in BALANCE_MODES:
    raise ValueError(f"balance must be one of {BALANCE_MODES}, got {balance!r}")
  if dtype not in ("float32", "float64"):
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
  storage_dtype = storage_dtype or dtype
  allowed = ("float16", "bfloat16", "float32", "float64")
  if storage_dtype not in allowed:
    raise ValueError(f"storage_dtype must be one of {allowed}, got {storage_dtype!r}")
  return dtype, storage_dtype


def _warm_start_vectors(warm_start, heads):
  """Per-head log alpha to start from (None where there is none), checked against the heads' K."""
  shapes = [tuple(int(d) for d in (h.shape if hasattr(h, "shape") else h)) for h in heads]
  if warm_start is None:
    return [None] * len(shapes)
  vectors = warm_start.log_row_scale if isinstance(warm_start, LabelAssignment) else warm_start
  vectors = [np.asarray(v, np.float64) for v in vectors]
  expected = [s[1] for s in shapes]
  if [v.shape for v in vectors] != [(k,) for k in expected]:
    raise ValueError(f"warm_start: expected log alpha vectors of lengths {expected} (one per head), "
                     f"got {[v.shape for v in vectors]}")
  if not all(np.all(np.isfinite(v)) for v in vectors):
    raise ValueError("warm_start: log alpha vectors must be finite")
  return vectors


def _chunks(head, dtype):
  num_examples, num_clusters = (int(d) for d in head.shape)
  rows = max(1, _CHUNK_BYTES // (4 * num_clusters))
  for start in range(0, num_examples, rows):
    chunk = head[start:start + rows]
    yield start, tf.cast(tf.convert_to_tensor(chunk), dtype)


def _shift_statistics(head, dtype):
  """Pass 1: (col_shift [N], row_shift [K], number of non-finite entries) of one head."""
  col_shifts, row_shift, nonfinite = [], None, 0
  for _, chunk in _chunks(head, dtype):
    col_shift, row_max, bad = sinkhorn.shift_stats(chunk)
    col_shifts.append(col_shift)
    row_shift = row_max if row_shift is None else tf.maximum(row_shift, row_max)
    nonfinite += int(bad)
  return tf.concat(col_shifts, 0), row_shift, nonfinite


def _power_matrix(head, col_shift, row_shift, lam, dtype, storage_dtype):
  """Pass 2: P^lam with both shifts, written chunk by chunk into one [N, K] variable."""
  power = tf.Variable(tf.zeros(head.shape, storage_dtype), trainable=False)
  lam_t = tf.constant(lam, dtype)
  probe = tf.zeros([], storage_dtype)
  for start, chunk in _chunks(head, dtype):
    stop = start + int(chunk.shape[0])
    power[start:stop].assign(sinkhorn.shifted_power(chunk, col_shift[start:stop], row_shift, lam_t, probe))
  return power


def _initial_row_scale(log_alpha, row_shift, lam, num_clusters, dtype):
  """r to start from: uniform, or a previous log alpha moved into this call's shifted frame."""
  if log_alpha is None:
    return tf.fill([num_clusters], tf.constant(1.0 / num_clusters, dtype))
  log_r = log_alpha + lam * row_shift.numpy().astype(np.float64)
  # r only matters up to a constant factor (c is recomputed from it), so normalise to avoid overflow.
  return tf.constant(np.exp(log_r - log_r.max()), dtype)


_solvers = {}


def _solver_for(block_rows, num_parts):
  key = ("solve", block_rows, num_parts)
  if key not in _solvers:
    _solvers[key] = sinkhorn.make_solver(block_rows, num_parts)
  return _solvers[key]


def _pass_for(block_rows, num_parts):
  key = ("pass", block_rows, num_parts)
  if key not in _solvers:
    _solvers[key] = sinkhorn.make_pass(block_rows, num_parts)
  return _solvers[key]


def _device_type(tensor):
  return tf.DeviceSpec.from_string(tensor.device).device_type or "CPU"


def _solve(power, row_scale, tol, max_iters, log_every, name):
  """Runs the XLA solver in rounds of `log_every` iterations, logging progress between rounds."""
  num_examples, num_clusters = (int(d) for d in power.shape)
  solve = _solver_for(*sinkhorn.default_blocking(num_examples, num_clusters, power.dtype,
                                                 _device_type(power)))
  dtype = row_scale.dtype
  tol_t = tf.constant(tol, dtype)
  done = 0
  while True:
    rounds = min(log_every, max_iters - done)
    used, next_row_scale, col_scale, iterations, error = solve(power, row_scale, tf.constant(rounds),
                                                               tol_t)
    done += int(iterations)
    error = float(error)
    if error <= tol or done >= max_iters:
      level = logging.INFO if error <= tol else logging.WARNING
      logger.log(level, "Sinkhorn %s: %s after %d iterations, marginal error %.3g (tol %g)", name,
                 "converged" if error <= tol else "stopped at max_iters", done, error, tol)
      return used, col_scale, done, error
    logger.info("Sinkhorn %s: iteration %d, marginal error %.3g (tol %g)", name, done, error, tol)
    row_scale = next_row_scale


def _exact_equipartition(power, row_scale, col_scale):
  num_examples, num_clusters = (int(d) for d in power.shape)
  m = min(_CANDIDATES, num_clusters)
  scores, clusters = [], []
  rows = max(1, _CHUNK_BYTES // (4 * num_clusters))
  for start in range(0, num_examples, rows):
    stop = min(start + rows, num_examples)
    log_q = sinkhorn.conditional_log_q(power[start:stop], row_scale, col_scale[start:stop],
                                       num_examples)
    top = tf.math.top_k(log_q, k=m)
    scores.append(top.values.numpy())
    clusters.append(top.indices.numpy())

  def rescore(example_ids):
    ids = tf.constant(example_ids)
    return sinkhorn.conditional_log_q(tf.gather(power, ids), row_scale, tf.gather(col_scale, ids),
                                      num_examples).numpy()

  return equipartition.round_to_equipartition(np.concatenate(scores), np.concatenate(clusters),
                                              num_clusters, rescore)
