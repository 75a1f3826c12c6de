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

import collections.abc
import dataclasses
import logging
import math
from typing import Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from selabel_tf import solvers

logger = logging.getLogger(__name__)

DEFAULT_TOL = 0.1
DEFAULT_MAX_ITERS = 2000
# Measured by benchmarks/sinkhorn.py's shapes: 1.8 cuts the iterations to tol 0.1 by 1.7-1.8x.
DEFAULT_OVER_RELAXATION = 1.8
BALANCE_MODES = ("argmax", "exact", "sample")
STORAGE_DTYPES = ("float16", "bfloat16", "float32", "float64")


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
    exchanged_bytes: payload each replica sent to all-reduces and gathers (0 on one device).
  """
  labels: np.ndarray
  log_row_scale: tuple
  log_col_scale: tuple
  iterations: np.ndarray
  marginal_error: np.ndarray
  tol: float
  exchanged_bytes: int = 0

  @property
  def converged(self) -> np.ndarray:
    return self.marginal_error <= self.tol

  def cluster_sizes(self, head: int = 0) -> np.ndarray:
    return np.bincount(self.labels[head], minlength=self.log_row_scale[head].shape[0])


# The lambdas a cold start solves at (part of this API; the solve lives in `solvers`).
annealing_stages = solvers.annealing_stages

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
  device_type = solvers.device_type(tf.zeros([]))
  stages = [solvers.lambda_stages(lam, log_alpha, anneal) for log_alpha in init_log_alpha]
  # Each head starts at its first stage's lambda: the input check's statistics serve its first kernel.
  head_solvers = [solvers.LocalHeadSolver(head, head_stages[0], dtype, storage_dtype, device_type)
                  for head, head_stages in zip(heads, stages)]
  # The first kernel statistics of every head come before any solving: bad input fails fast.
  for t, (solver, log_alpha) in enumerate(zip(head_solvers, init_log_alpha)):
    _raise_if_nonfinite(solver.check_finite(log_alpha), t, solver.num_examples * solver.num_clusters)
  results = []
  for t, (solver, log_alpha) in enumerate(zip(head_solvers, init_log_alpha)):
    results.append(solvers.solve_head(solver, stages[t], log_alpha, tol, max_iters, log_every,
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
      Or a sequence of T callables, callable t returning head t's distributed values [N_r, K_t] when
      that head is solved (e.g. from stored features, `label_store.LinearHeads.per_replica_head`):
      then only one head's log-probabilities exist at a time, and each head is checked for
      non-finite values when it is made.
    lam, tol, max_iters, warm_start, dtype, storage_dtype, anneal, over_relaxation, seed, log_every:
      as in `assign_labels`.
    balance: "argmax" or "sample", as in `assign_labels` (replica r samples from the stream
      (seed, t) folded with r); the exact equipartition rounding is single-device only.

  Returns:
    A `LabelAssignment` over all N examples, concatenated in replica order; its `exchanged_bytes`
    counts what each replica sent to the all-reduces and gathers.
  """
  if balance == "exact":
    raise ValueError("balance='exact' is single-device only: use assign_labels, or 'argmax' or 'sample'")
  dtype, storage_dtype = _check_options(lam, tol, max_iters, balance, dtype, storage_dtype, log_every,
                                        over_relaxation)
  eager = not (isinstance(per_replica_log_probs, (list, tuple)) and per_replica_log_probs
                and all(map(callable, per_replica_log_probs)))
  if not eager:
    providers = list(per_replica_log_probs)
  else:
    local_heads = _as_heads(strategy.experimental_local_results(per_replica_log_probs)[0],
                            check_sizes=False)
    heads = [strategy.run(lambda v, t=t: _as_heads(v, check_sizes=False)[t], args=(per_replica_log_probs,))
             for t in range(len(local_heads))]
    providers = [lambda head=head: head for head in heads]
  if not providers:
    raise ValueError("per_replica_log_probs: got no heads; expected T >= 1")
  if warm_start is not None and len(_warm_start_list(warm_start)) != len(providers):
    raise ValueError(f"warm_start: expected {len(providers)} log alpha vectors (one per head), got "
                     f"{len(_warm_start_list(warm_start))}")
  head_solvers = [None] * len(providers)
  init_log_alpha = [None] * len(providers)

  def make(t):
    solver = solvers.ShardedHeadSolver(strategy, providers[t](), lam, dtype, storage_dtype)
    _check_sizes(solver.num_examples, solver.num_clusters, t)
    if warm_start is not None:
      vectors = _warm_start_list(warm_start)
      init_log_alpha[t] = _warm_start_vectors([vectors[t]], [(solver.num_examples, solver.num_clusters)])[0]
    stages = solvers.lambda_stages(lam, init_log_alpha[t], anneal)
    solver.set_lam(stages[0])
    _raise_if_nonfinite(solver.check_finite(init_log_alpha[t]), t, solver.num_examples * solver.num_clusters)
    return solver, stages

  if eager:  # stored input: every head is checked before any is solved (bad input fails fast)
    head_solvers = [make(t) for t in range(len(providers))]
  results, exchanged = [], 0
  for t in range(len(providers)):
    solver, stages = head_solvers[t] or make(t)
    head_solvers[t] = None
    results.append(solvers.solve_head(solver, stages, init_log_alpha[t], tol, max_iters, log_every,
                                      f"sharded head {t + 1}/{len(providers)}", balance, over_relaxation,
                                      (seed, t)))
    exchanged += solver.exchanged_bytes
    solver.release()
  return _assignment(results, tol, exchanged)


def _assignment(results, tol, exchanged_bytes=0):
  labels, log_alpha, log_beta, iterations, errors = zip(*results)
  return LabelAssignment(labels=np.stack(labels).astype(np.int64), log_row_scale=tuple(log_alpha),
                         log_col_scale=tuple(log_beta), iterations=np.asarray(iterations),
                         marginal_error=np.asarray(errors, np.float64), tol=tol,
                         exchanged_bytes=int(exchanged_bytes))


def _raise_if_nonfinite(count, head_index, size):
  if count:
    raise ValueError(f"log_probs head {head_index} has {count} non-finite entries (NaN or inf) among "
                     f"{size}; self-labelling needs finite log-probabilities")


def _as_heads(log_probs, check_sizes=True):
  """The heads as a list of [N, K_t] array-likes, checked for rank and a common N."""
  if isinstance(log_probs, collections.abc.Sequence):  # a list, tuple or `label_store.LinearHeads`
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


def _warm_start_list(warm_start):
  return list(warm_start.log_row_scale if isinstance(warm_start, LabelAssignment) else warm_start)


def _warm_start_vectors(warm_start, heads):
  """Per-head log alpha to start from (None where there is none), checked against the heads' K."""
  shapes = [tuple(int(d) for d in (h.shape if hasattr(h, "shape") else h)) for h in heads]
  if warm_start is None:
    return [None] * len(shapes)
  vectors = [np.asarray(v, np.float64) for v in _warm_start_list(warm_start)]
  expected = [s[1] for s in shapes]
  if [v.shape for v in vectors] != [(k,) for k in expected]:
    raise ValueError(f"warm_start: expected log alpha vectors of lengths {expected} (one per head), "
                     f"got {[v.shape for v in vectors]}")
  if not all(np.all(np.isfinite(v)) for v in vectors):
    raise ValueError("warm_start: log alpha vectors must be finite")
  return vectors
