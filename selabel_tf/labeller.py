"""Self-labelling: equipartitioned pseudo-labels from stored log-probabilities (paper eqs. 6-8).

`assign_labels` solves, per head, the entropy-regularised transport problem of eq. 7 by the fast
Sinkhorn-Knopp iteration of eq. 8, Q = diag(alpha) P^lam diag(beta), and returns the argmax of Q per
example (or, with `balance="exact"`, a rounding of Q in which every cluster gets floor(N/K) or ceil(N/K)
examples; with `balance="sample"`, labels drawn from each example's q(k|n)). `assign_labels_sharded`
does the same when each replica of a `tf.distribute` strategy holds a slice of the examples; only
[K]-vectors cross replicas per iteration.

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

DEFAULT_TOL = 0.1
DEFAULT_MAX_ITERS = 2000
# Measured by benchmarks/sinkhorn.py's shapes: 1.8 cuts the iterations to tol 0.1 by 1.7-1.8x.
DEFAULT_OVER_RELAXATION = 1.8
BALANCE_MODES = ("argmax", "exact", "sample")
STORAGE_DTYPES = ("float16", "bfloat16", "float32", "float64")
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
                  anneal: bool = True,
                  over_relaxation: float = DEFAULT_OVER_RELAXATION,
                  seed: int = 0,
                  log_every: int = 100) -> LabelAssignment:
  """Assigns equipartitioned labels by Sinkhorn-Knopp, per head, on the current device.

  Args:
    log_probs: float [T, N, K] (numpy or tensor), or a sequence of T arrays [N, K_t] when heads differ
      in K. Log-probabilities from the network (logits work too: a per-example shift is absorbed into
      beta). Read in row chunks, a few times; any object with `.shape` and row slicing works.
    lam: lambda of eq. 7 (> 0); larger is closer to the exact transport problem and slower.
    tol: stop once every cluster's soft size is within this fraction of N/K.
    max_iters: at most this many iterations per head.
    warm_start: a previous `LabelAssignment`, or a sequence of T log alpha vectors [K_t]
      (paper sec. 3.1: alpha and beta can be retained between steps; beta follows from alpha).
    balance: "argmax" (the paper: argmax of Q), "exact" (cluster sizes floor(N/K) or ceil(N/K)) or
      "sample" (each label drawn from q(k|n) = N Q[n, k], seeded by `seed`: sizes N/K in expectation.
      For a nearly flat Q, as an untrained network gives, whose argmax can collapse onto a few
      clusters).
    dtype: "float32" or "float64", the precision of the iteration.
    storage_dtype: dtype of the stored kernel P^lam; defaults to `dtype`. "float16"/"bfloat16" halve
      the bytes read per iteration.
    anneal: without a warm start, solve at lam / 2^s, ..., lam / 2 first, each stage warm-starting
      the next (epsilon-scaling; see `annealing_stages`): the same problem, far fewer iterations and
      re-centrings at large lam. A warm start never anneals.
    over_relaxation: omega in [1, 2) of the over-relaxed row half-step (1: plain Sinkhorn-Knopp; see
      `sinkhorn.over_relaxed_row_step`). Same solution, fewer iterations; if a stretch of `log_every`
      iterations makes no progress, the solve falls back to 1.
    seed: seed of `balance="sample"` (head t draws from the stream (seed, t)).
    log_every: log progress (and check for a stop) every this many iterations.

  Returns:
    A `LabelAssignment`.

  Raises:
    ValueError: on NaN/inf in `log_probs` (before any work, naming the head and count), a bad shape,
      lam <= 0, N < K, or an option outside its allowed values.
  """
  heads = _as_heads(log_probs)
  dtype, storage_dtype = _check_options(lam, tol, max_iters, balance, dtype, storage_dtype, log_every,
                                        over_relaxation)
  init_log_alpha = _warm_start_vectors(warm_start, [h.shape for h in heads])
  device_type = _device_type(tf.zeros([]))
  stages = [_lambda_stages(lam, log_alpha, anneal) for log_alpha in init_log_alpha]
  # Each head starts at its first stage's lambda: the input check's statistics serve its first kernel.
  solvers = [_LocalHead(head, head_stages[0], dtype, storage_dtype, device_type)
             for head, head_stages in zip(heads, stages)]
  # The first kernel statistics of every head come before any solving: bad input fails fast.
  for t, (solver, log_alpha) in enumerate(zip(solvers, init_log_alpha)):
    solver.check_finite(t, log_alpha)
  results = []
  for t, (solver, log_alpha) in enumerate(zip(solvers, init_log_alpha)):
    results.append(_run(solver, stages[t], log_alpha, tol, max_iters, log_every,
                        f"head {t + 1}/{len(heads)}", balance, over_relaxation, (seed, t)))
    solver.release()
  return _assignment(results, tol)


def assign_labels_sharded(strategy: tf.distribute.Strategy,
                          per_replica_log_probs,
                          lam: float,
                          *,
                          tol: float = DEFAULT_TOL,
                          max_iters: int = DEFAULT_MAX_ITERS,
                          warm_start: Union[None, LabelAssignment, Sequence[np.ndarray]] = None,
                          dtype: str = "float32",
                          storage_dtype: Optional[str] = None,
                          anneal: bool = True,
                          balance: str = "argmax",
                          over_relaxation: float = DEFAULT_OVER_RELAXATION,
                          seed: int = 0,
                          log_every: int = 100) -> LabelAssignment:
  """`assign_labels` with the examples sharded over the replicas of `strategy`.

  Each replica keeps its slice of the kernel on its own device; per iteration only the [K] row sums
  are all-reduced (`strategy.reduce`), so this scales to several devices and workers. Call it in
  cross-replica context (e.g. from a Keras callback), not inside `strategy.run`.

  Args:
    strategy: the `tf.distribute.Strategy` holding the shards.
    per_replica_log_probs: distributed values whose per-replica value is a tuple of T tensors
      [N_r, K_t] (or one tensor [T, N_r, K]): replica r's slice of the examples, in replica order.
    lam, tol, max_iters, warm_start, dtype, storage_dtype, anneal, over_relaxation, seed, log_every:
      as in `assign_labels`.
    balance: "argmax" or "sample", as in `assign_labels` (replica r samples from the stream
      (seed, t) folded with r); the exact equipartition rounding is single-device only.

  Returns:
    A `LabelAssignment` over all N examples, concatenated in replica order.
  """
  if balance == "exact":
    raise ValueError("balance='exact' is single-device only: use assign_labels, or 'argmax' or 'sample'")
  dtype, storage_dtype = _check_options(lam, tol, max_iters, balance, dtype, storage_dtype, log_every,
                                        over_relaxation)
  local_heads = _as_heads(strategy.experimental_local_results(per_replica_log_probs)[0],
                          check_sizes=False)
  solvers = [_ShardedHead(strategy, per_replica_log_probs, t, lam, dtype, storage_dtype)
             for t in range(len(local_heads))]
  init_log_alpha = _warm_start_vectors(warm_start, [(s.num_examples, s.num_clusters) for s in solvers])
  stages = [_lambda_stages(lam, log_alpha, anneal) for log_alpha in init_log_alpha]
  for solver, head_stages in zip(solvers, stages):
    solver.set_lam(head_stages[0])
  for t, (solver, log_alpha) in enumerate(zip(solvers, init_log_alpha)):
    solver.check_finite(t, log_alpha)
  results = []
  for t, (solver, log_alpha) in enumerate(zip(solvers, init_log_alpha)):
    results.append(_run(solver, stages[t], log_alpha, tol, max_iters, log_every,
                        f"sharded head {t + 1}/{len(solvers)}", balance, over_relaxation, (seed, t)))
    solver.release()
  return _assignment(results, tol)


# A cold start anneals lambda (epsilon-scaling): it solves at lam / 2^s, ..., lam / 2, lam, each stage
# warm-starting the next, from the largest s with lam / 2^s >= _ANNEAL_MIN_LAM. The scalings of a large
# lambda span a wide range, which a cold start at that lambda crosses slowly (and with many
# re-centrings); at small lambda the problem is smooth and converges in few iterations. Intermediate
# stages stop at a marginal error of _ANNEAL_TOL (or the final tol if looser).
_ANNEAL_MIN_LAM = 2.0
_ANNEAL_TOL = 0.3


def _lambda_stages(lam, log_alpha, anneal):
  """The lambdas one head is solved at: the annealing stages on a cold start, else just lam."""
  return annealing_stages(lam) if anneal and log_alpha is None else [float(lam)]


def annealing_stages(lam: float) -> list:
  """The lambdas a cold start solves at: [lam / 2^s, ..., lam / 2, lam]."""
  stages = [float(lam)]
  while stages[0] / 2 >= _ANNEAL_MIN_LAM:
    stages.insert(0, stages[0] / 2)
  return stages


# Spread of log r (nats) past which the kernel is re-centred: about half the storage dtype's range
# below 1, so that entries that underflowed cannot yet matter.
_ABSORB_LIMIT = {"float16": 8.0, "bfloat16": 40.0, "float32": 40.0, "float64": 300.0}


def _run(solver, stages, log_alpha, tol, max_iters, log_every, name, balance, omega, seed):
  """The Sinkhorn loop shared by the local and sharded solvers, with absorption and progress logs.

  `stages` are the lambdas solved at in turn (see `annealing_stages`); the last is the problem's.

  Returns:
    (labels [N], log alpha [K], log beta [N], iterations, marginal error).
  """
  num_clusters = solver.num_clusters
  final_lam = stages[-1]
  if log_alpha is None:
    log_alpha = np.zeros(num_clusters)
  uniform = tf.fill([num_clusters], tf.constant(1.0 / num_clusters, solver.dtype))
  limit = _ABSORB_LIMIT[solver.storage_dtype]
  done, absorptions = 0, 0
  for stage, lam in enumerate(stages):
    last = stage == len(stages) - 1
    stage_tol = tol if last else max(tol, _ANNEAL_TOL)
    solver.set_lam(lam)
    if stage:
      # Warm start: log alpha scales about linearly with lambda. One pass over the log-probs.
      log_alpha = log_alpha * (lam / stages[stage - 1])
      log_alpha -= log_alpha.max()
      solver.recentre(log_alpha, limit)
    else:
      solver.build_kernel(log_alpha)
    row_scale = uniform
    last_error = math.inf
    while True:
      used, next_row_scale, iterations, error = solver.iterate(
          row_scale, min(log_every, max_iters - done), stage_tol, limit, omega)
      done += iterations
      if error <= stage_tol or done >= max_iters:
        break
      if omega != 1.0 and iterations >= log_every and error >= last_error:
        logger.warning("Sinkhorn %s: no progress over %d over-relaxed iterations (marginal error %.3g); "
                       "continuing without over-relaxation", name, iterations, error)
        omega = 1.0
      last_error = error
      if float(sinkhorn.log_spread(next_row_scale)) > limit:
        # Fold r into log alpha and rebuild the kernel around it; continue from a uniform r.
        log_alpha = np.log(next_row_scale.numpy().astype(np.float64)) - solver.row_offset
        log_alpha -= log_alpha.max()
        solver.recentre(log_alpha, limit)
        row_scale = uniform
        absorptions += 1
      else:
        row_scale = next_row_scale
      logger.info("Sinkhorn %s: iteration %d, lambda %g, marginal error %.3g (tol %g)", name, done, lam,
                  error, stage_tol)
    log_alpha = np.log(used.numpy().astype(np.float64)) - solver.row_offset
    if done >= max_iters:
      break
  converged = error <= tol and lam == final_lam
  logger.log(logging.INFO if converged else logging.WARNING,
             "Sinkhorn %s: %s after %d iterations (%d re-centrings, lambda %s), marginal error %.3g "
             "(tol %g)", name, "converged" if converged else "stopped at max_iters", done, absorptions,
             " -> ".join(f"{l:g}" for l in stages), error, tol)
  if lam != final_lam:  # max_iters ran out in an annealing stage: finish on the kernel of lambda
    log_alpha = log_alpha * (final_lam / lam)
    solver.set_lam(final_lam)
    solver.build_kernel(log_alpha - log_alpha.max())
    used = uniform
  col_scale = solver.column_scale(used)
  if balance == "argmax":
    labels = solver.argmax_labels(used)
  elif balance == "sample":
    labels = solver.sample_labels(used, seed)
  else:
    labels = solver.exact_equipartition(used, col_scale)
  log_alpha = np.log(used.numpy().astype(np.float64)) - solver.row_offset
  log_beta = np.log(solver.gather(col_scale).astype(np.float64)) - solver.col_offset
  return labels, log_alpha, log_beta, done, error


def _assignment(results, tol):
  labels, log_alpha, log_beta, iterations, errors = zip(*results)
  return LabelAssignment(labels=np.stack(labels).astype(np.int64), log_row_scale=tuple(log_alpha),
                         log_col_scale=tuple(log_beta), iterations=np.asarray(iterations),
                         marginal_error=np.asarray(errors, np.float64), tol=tol)


class _Head:
  """What the local and sharded heads share: the first kernel statistics double as the input check."""

  _stats = None

  def check_finite(self, head_index, log_alpha):
    log_alpha = np.zeros(self.num_clusters) if log_alpha is None else log_alpha
    self._stats = (log_alpha, self.lam_value, self._kernel_stats(log_alpha))
    _raise_if_nonfinite(self._stats[2][2], head_index, self.num_examples * self.num_clusters)

  def set_lam(self, lam):
    """The lambda of the next kernel built (annealing)."""
    self.lam_value = float(lam)
    self.lam = tf.constant(lam, self.dtype)

  def _offsets(self, log_alpha):
    """(col_offset, row_offset) for `log_alpha`, reusing the statistics of `check_finite`."""
    if (self._stats is not None and self._stats[1] == self.lam_value
        and np.array_equal(self._stats[0], log_alpha)):
      col_offset, row_offset, _ = self._stats[2]
    else:
      col_offset, row_offset, _ = self._kernel_stats(log_alpha)
    self._stats = None
    return col_offset, row_offset


class _LocalHead(_Head):
  """One head's kernel on the current device, as a tuple of row chunks."""

  def __init__(self, head, lam, dtype, storage_dtype, device_type):
    self.head = head
    self.num_examples, self.num_clusters = (int(d) for d in head.shape)
    self.dtype, self.storage_dtype = dtype, storage_dtype
    self.set_lam(lam)
    self.bounds, self.block_rows = sinkhorn.plan_chunks(self.num_examples, self.num_clusters,
                                                        storage_dtype, device_type)
    self._stats = None
    self.power = None

  def _chunks(self):
    for start, stop in zip(self.bounds[:-1], self.bounds[1:]):
      yield start, stop, tf.cast(tf.convert_to_tensor(self.head[start:stop]), self.dtype)

  def _kernel_stats(self, log_alpha):
    log_alpha_t = tf.constant(log_alpha, self.dtype)
    col_offsets, row_max, nonfinite = [], None, 0
    for _, _, chunk in self._chunks():
      col_offset, chunk_row_max, bad = sinkhorn.kernel_stats(chunk, self.lam, log_alpha_t)
      col_offsets.append(col_offset)
      row_max = chunk_row_max if row_max is None else tf.maximum(row_max, chunk_row_max)
      nonfinite += int(bad)
    return tf.concat(col_offsets, 0), row_max - log_alpha_t, nonfinite

  def build_kernel(self, log_alpha):
    col_offset, row_offset = self._offsets(log_alpha)
    self.power = None  # the old kernel goes before the new one is built
    probe = tf.zeros([], self.storage_dtype)
    self.power = tuple(
        sinkhorn.kernel_chunk(chunk, self.lam, col_offset[start:stop], row_offset, probe)
        for start, stop, chunk in self._chunks())
    self.col_offset = col_offset.numpy().astype(np.float64)
    self.row_offset = row_offset.numpy().astype(np.float64)

  def recentre(self, log_alpha, absorb_limit):
    """Rebuilds the kernel around `log_alpha` in one pass over the log-probs (two if a row underflows)."""
    log_alpha_t = tf.constant(log_alpha, self.dtype)
    probe = tf.zeros([], self.storage_dtype)
    self.power = None
    power, col_offsets, row_max = [], [], None
    for _, _, chunk in self._chunks():
      kernel, col_offset, chunk_row_max = sinkhorn.recentred_kernel_chunk(chunk, self.lam, log_alpha_t,
                                                                          probe)
      power.append(kernel)
      col_offsets.append(col_offset)
      row_max = chunk_row_max if row_max is None else tf.maximum(row_max, chunk_row_max)
    if float(tf.reduce_min(row_max)) < math.exp(-absorb_limit):
      del power
      self.build_kernel(log_alpha)
      return
    self.power = tuple(power)
    self.col_offset = tf.concat(col_offsets, 0).numpy().astype(np.float64)
    self.row_offset = -np.asarray(log_alpha, np.float64)

  def iterate(self, row_scale, max_iters, tol, absorb_limit, omega):
    solve = _solver_for(self.block_rows)
    used, next_row_scale, iterations, error = solve(
        self.power, row_scale, tf.constant(max_iters), tf.constant(tol, self.dtype),
        tf.constant(absorb_limit, self.dtype), tf.constant(omega, self.dtype))
    return used, next_row_scale, int(iterations), float(error)

  def column_scale(self, row_scale):
    return sinkhorn.column_scale(self.power, row_scale,
                                 tf.constant(1.0 / self.num_examples, self.dtype))

  def gather(self, col_scale):
    return col_scale.numpy()

  def argmax_labels(self, row_scale):
    return sinkhorn.argmax_labels(self.power, row_scale).numpy()

  def sample_labels(self, row_scale, seed):
    return sinkhorn.sample_labels(self.power, row_scale, seed).numpy()

  def exact_equipartition(self, row_scale, col_scale):
    return _exact_equipartition(self.head, self.power, self.bounds, row_scale, col_scale)

  def release(self):
    self.power = None


class _ShardedHead(_Head):
  """One head's kernel sharded over the replicas of a strategy: each replica holds its rows."""

  def __init__(self, strategy, per_replica_log_probs, head_index, lam, dtype, storage_dtype):
    self.strategy = strategy
    self.dtype, self.storage_dtype = dtype, storage_dtype
    self.set_lam(lam)
    self.values = strategy.run(lambda v: tf.cast(_as_heads(v, check_sizes=False)[head_index], dtype),
                               args=(per_replica_log_probs,))
    local = strategy.experimental_local_results(self.values)
    self.num_clusters = int(local[0].shape[1])
    self.num_examples = int(self._sum(strategy.run(lambda v: tf.shape(v, out_type=tf.int64)[0],
                                                   args=(self.values,))))
    _check_sizes(self.num_examples, self.num_clusters, head_index)
    # Each replica's slice is one chunk: the replicas are the parallel units here.
    self.block_rows = max(int(v.shape[0]) for v in local)
    self._stats = None
    self.power = None

  def _sum(self, per_replica):
    return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

  def _kernel_stats(self, log_alpha):
    log_alpha_t = tf.constant(log_alpha, self.dtype)
    col_offset, row_max, nonfinite = self.strategy.run(
        sinkhorn.kernel_stats, args=(self.values, self.lam, log_alpha_t))
    # strategy.reduce has no MAX: gather the [K] maxima of all replicas and reduce here.
    stacked = self.strategy.gather(self.strategy.run(lambda m: m[None, :], args=(row_max,)), axis=0)
    row_offset = tf.reduce_max(stacked, axis=0) - log_alpha_t
    return col_offset, row_offset, int(self._sum(nonfinite))

  def build_kernel(self, log_alpha):
    col_offset, row_offset = self._offsets(log_alpha)
    self.power = None
    probe = tf.zeros([], self.storage_dtype)
    self.power = self.strategy.run(
        lambda v, a: (sinkhorn.kernel_chunk(v, self.lam, a, row_offset, probe),),
        args=(self.values, col_offset))
    self._col_offset = col_offset
    self.row_offset = row_offset.numpy().astype(np.float64)

  @property
  def col_offset(self):
    return self.strategy.gather(self._col_offset, axis=0).numpy().astype(np.float64)

  def recentre(self, log_alpha, absorb_limit):
    del absorb_limit
    self.build_kernel(log_alpha)

  def iterate(self, row_scale, max_iters, tol, absorb_limit, omega):
    """Iterations with one [K] all-reduce each (a python loop: each step crosses replicas)."""
    one_pass = _pass_for(self.block_rows)
    inv_n = tf.constant(1.0 / self.num_examples, self.dtype)
    inv_k = 1.0 / self.num_clusters
    tiny = np.finfo(self.dtype).tiny
    error, used = math.inf, row_scale
    for iteration in range(1, max_iters + 1):
      used = row_scale
      total = self._sum(self.strategy.run(one_pass, args=(self.power, used, inv_n)))
      error = float(sinkhorn.row_marginal_error(used, total))
      row_scale = sinkhorn.over_relaxed_row_step(used, inv_k / tf.maximum(total, tiny),
                                                 tf.constant(omega, self.dtype))
      if error <= tol or float(sinkhorn.log_spread(row_scale)) > absorb_limit:
        break
    return used, row_scale, iteration, error

  def column_scale(self, row_scale):
    inv_n = tf.constant(1.0 / self.num_examples, self.dtype)
    return self.strategy.run(sinkhorn.column_scale, args=(self.power, row_scale, inv_n))

  def gather(self, col_scale):
    return self.strategy.gather(col_scale, axis=0).numpy()

  def argmax_labels(self, row_scale):
    labels = self.strategy.run(sinkhorn.argmax_labels, args=(self.power, row_scale))
    return self.strategy.gather(labels, axis=0).numpy()

  def sample_labels(self, row_scale, seed):
    def replica_sample(power, row_scale):
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      key = tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64), replica)
      return sinkhorn.sample_labels(power, row_scale, key)
    labels = self.strategy.run(replica_sample, args=(self.power, row_scale))
    return self.strategy.gather(labels, axis=0).numpy()

  def release(self):
    self.power = None


def _raise_if_nonfinite(count, head_index, size):
  if count:
    raise ValueError(f"log_probs head {head_index} has {count} non-finite entries (NaN or inf) among "
                     f"{size}; self-labelling needs finite log-probabilities")


def _as_heads(log_probs, check_sizes=True):
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
    if check_sizes:
      _check_sizes(int(head.shape[0]), int(head.shape[1]), t)
  return heads


def _check_sizes(num_examples, num_clusters, head):
  if num_clusters < 1:
    raise ValueError(f"log_probs head {head}: needs at least 1 cluster, got K={num_clusters}")
  if num_examples < num_clusters:
    raise ValueError(f"log_probs head {head}: N={num_examples} examples cannot be split equally among "
                     f"K={num_clusters} clusters; need N >= K")


def _check_options(lam, tol, max_iters, balance, dtype, storage_dtype, log_every, over_relaxation):
  if not (isinstance(over_relaxation, (int, float, np.integer, np.floating))
          and 1.0 <= over_relaxation < 2.0):
    raise ValueError(f"over_relaxation must be in [1, 2), got {over_relaxation!r}")
  if not (isinstance(lam, (int, float, np.integer, np.floating)) and not isinstance(lam, bool)
          and math.isfinite(lam) and lam > 0):
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
  if storage_dtype not in STORAGE_DTYPES:
    raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
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


_solvers = {}


def _solver_for(block_rows):
  key = ("solve", block_rows)
  if key not in _solvers:
    _solvers[key] = sinkhorn.make_solver(block_rows)
  return _solvers[key]


def _pass_for(block_rows):
  key = ("pass", block_rows)
  if key not in _solvers:
    _solvers[key] = sinkhorn.make_pass(block_rows)
  return _solvers[key]


def _device_type(tensor):
  return tf.DeviceSpec.from_string(tensor.device).device_type or "CPU"


def _exact_equipartition(head, power, bounds, row_scale, col_scale):
  """Labels of an exact equipartition: rounding of Q, then local search on sum_n -log p(label_n)."""
  num_examples, num_clusters = bounds[-1], int(power[0].shape[1])
  m = min(_CANDIDATES, num_clusters)
  scores, clusters, log_probs = [], [], []
  for start, stop, chunk in zip(bounds[:-1], bounds[1:], power):
    log_q = sinkhorn.conditional_log_q(chunk, row_scale, col_scale[start:stop], num_examples)
    top = tf.math.top_k(log_q, k=m)
    scores.append(top.values.numpy())
    clusters.append(top.indices.numpy())
    head_chunk = tf.convert_to_tensor(head[start:stop])
    log_probs.append(tf.gather(head_chunk, top.indices, batch_dims=1).numpy())

  def rescore(example_ids):
    chunk_of = np.searchsorted(bounds, example_ids, side="right") - 1
    rows = np.empty((example_ids.size, num_clusters))
    for c in np.unique(chunk_of):
      here = np.flatnonzero(chunk_of == c)
      ids = example_ids[here]
      rows[here] = sinkhorn.conditional_log_q(tf.gather(power[c], ids - bounds[c]), row_scale,
                                              tf.gather(col_scale, ids), num_examples).numpy()
    return rows

  clusters, log_probs = np.concatenate(clusters), np.concatenate(log_probs)
  labels = equipartition.round_to_equipartition(np.concatenate(scores), clusters, num_clusters, rescore)
  label_log_probs = np.concatenate([
      tf.gather(tf.convert_to_tensor(head[start:stop]), labels[start:stop, None], batch_dims=1).numpy()[:, 0]
      for start, stop in zip(bounds[:-1], bounds[1:])])
  return equipartition.improve_by_local_search(labels, clusters, log_probs, label_log_probs,
                                               num_clusters)
