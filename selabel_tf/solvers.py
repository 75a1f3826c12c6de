"""The Sinkhorn-Knopp solve of one head, on one device or sharded over the replicas of a strategy.

`solve_head` is the loop around the iteration: annealing lambda on a cold start, re-centring the kernel
when the scalings spread too far, stopping at the tolerance, and the labels at the end. It talks to the
head's kernel through `HeadSolver`, the one contract of the two places a kernel can live:

* `LocalHeadSolver`: the kernel as row chunks on the current device (streamed from host chunk by chunk,
  so the log-probabilities never need to be whole in device memory, nor whole anywhere: any object with
  `.shape` and row slicing, such as `selabel_tf.label_store.LinearHeadLogProbs`, works);
* `ShardedHeadSolver`: each replica of a `tf.distribute` strategy (on one worker or several) holds the
  kernel rows of its own examples; only [K] vectors cross replicas per iteration.

Both run the same iteration, `sinkhorn.iterations` (its body and stopping rule are written once, there):
the local solver compiles it with XLA around the fused pass over its chunks; the sharded one runs it in
a `tf.function` whose row sums are one all-reduce of [K] per iteration.
"""

import abc
import logging
import math

import numpy as np
import tensorflow as tf

from selabel_tf import equipartition
from selabel_tf import sinkhorn

logger = logging.getLogger(__name__)

_CANDIDATES = 8  # clusters per example kept for the exact-equipartition rounding
# Derived re-centrings (see `LocalHeadSolver._derive`): entries lost to underflow stay below e^-40 of
# their example's largest (float32's range is e^-87).
_DERIVE_SPREAD = 47.0

# A cold start anneals lambda (epsilon-scaling): it solves at lam / 2^s, ..., lam / 2, lam, each stage
# warm-starting the next, from the largest s with lam / 2^s >= _ANNEAL_MIN_LAM. The scalings of a large
# lambda span a wide range, which a cold start at that lambda crosses slowly (and with many
# re-centrings); at small lambda the problem is smooth and converges in few iterations. Intermediate
# stages stop at a marginal error of _ANNEAL_TOL (or the final tol if looser).
_ANNEAL_MIN_LAM = 2.0
_ANNEAL_TOL = 0.3


def lambda_stages(lam, log_alpha, anneal):
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


def solve_head(solver, stages, log_alpha, tol, max_iters, log_every, name, balance, omega, seed):
  """Solves one head to `tol` through `solver` (a `HeadSolver`), with absorption and progress logs.

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


class HeadSolver(abc.ABC):
  """Where one head's kernel lives, and the operations `solve_head` runs on it (the paper's P^lam,
  held re-centred as `sinkhorn` describes: power[n, k] = exp(lam log_probs[n, k] - col_offset[n] -
  row_offset[k])).

  Attributes set by every implementation:
    num_examples, num_clusters: N (over every shard) and K.
    dtype, storage_dtype: the compute dtype and the dtype the kernel is stored in (names).
    lam, lam_value: the lambda of the next kernel built (tensor in `dtype`, python float).
    row_offset: float64 [K], the kernel's row offsets (set by `build_kernel` / `recentre`).
    col_offset: float64 [N], its column offsets, in example order (gathered from the shards).
  """

  _stats = None

  def check_finite(self, log_alpha) -> int:
    """Computes the first kernel's statistics (kept for `build_kernel`, which would compute them
    again) and returns the number of non-finite log-probabilities: the input check costs no pass."""
    log_alpha = np.zeros(self.num_clusters) if log_alpha is None else log_alpha
    self._stats = (log_alpha, self.lam_value, self._kernel_stats(log_alpha))
    return self._stats[2][2]

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

  def iterate(self, row_scale, max_iters, tol, absorb_limit, omega):
    """Up to `max_iters` iterations of `sinkhorn.iterations` from `row_scale` (see there).

    Returns:
      (used [K], next_row_scale [K], iterations run: int, marginal error of `used`: float).
    """
    used, next_row_scale, iterations, error = self._iterations()(
        self.power, row_scale, tf.constant(max_iters), tf.constant(tol, self.dtype),
        tf.constant(absorb_limit, self.dtype), tf.constant(omega, self.dtype))
    return used, next_row_scale, int(iterations), float(error)

  @abc.abstractmethod
  def _kernel_stats(self, log_alpha):
    """(col_offset [N] tensor(s), row_offset [K] tensor, non-finite count) of the kernel around
    `log_alpha` (one pass over the log-probabilities)."""

  @abc.abstractmethod
  def build_kernel(self, log_alpha):
    """Builds the kernel at the current lambda, centred on `log_alpha` (float64 [K])."""

  @abc.abstractmethod
  def recentre(self, log_alpha, absorb_limit):
    """Rebuilds the kernel around `log_alpha` (an absorption of r, or a new annealing stage)."""

  @abc.abstractmethod
  def _iterations(self):
    """The compiled `sinkhorn.iterations` over this kernel: `(power, row_scale, max_iters, tol,
    absorb_limit, omega) -> (used, next_row_scale, iterations, error)`."""

  @abc.abstractmethod
  def column_scale(self, row_scale):
    """c = (1/N) / (power r), in this solver's layout (see `gather`)."""

  @abc.abstractmethod
  def gather(self, col_scale) -> np.ndarray:
    """`column_scale`'s result as numpy [N], in example order."""

  @abc.abstractmethod
  def argmax_labels(self, row_scale) -> np.ndarray:
    """int64 [N], argmax_k Q[n, k], in example order."""

  @abc.abstractmethod
  def sample_labels(self, row_scale, seed) -> np.ndarray:
    """int64 [N], labels drawn from q(k|n), in example order."""

  def exact_equipartition(self, row_scale, col_scale) -> np.ndarray:
    """int64 [N], an exact equipartition rounding of Q (single-device solvers only)."""
    raise ValueError(f"balance='exact' is not available with {type(self).__name__}")

  def release(self):
    """Frees the kernel."""
    self.power = None


class LocalHeadSolver(HeadSolver):
  """One head's kernel on the current device, as a tuple of row chunks."""

  def __init__(self, head, lam, dtype, storage_dtype, device_type):
    self.head = head
    self.num_examples, self.num_clusters = (int(d) for d in head.shape)
    self.dtype, self.storage_dtype = dtype, storage_dtype
    self.set_lam(lam)
    # A head whose rows are computed on demand (e.g. from stored features) sets `rows_per_read`: it is
    # read in parts of at most that many rows, so that only a part's log-probs exist at a time; and
    # where the kernel's dtype has float32's range, its re-centrings are derived from the kernel itself
    # (`sinkhorn.derived_kernel_chunk`) rather than computed again from the head.
    self.rows_per_read = getattr(head, "rows_per_read", None)
    self.bounds, self.block_rows, self.part_rows = sinkhorn.plan_chunks(
        self.num_examples, self.num_clusters, storage_dtype, device_type, self.rows_per_read)
    self.derive_recentrings = (self.rows_per_read is not None
                               and storage_dtype in ("bfloat16", "float32", "float64"))
    self._stats = None
    self.power = None

  def _parts(self):
    """(chunk index, start, stop, log-probs [stop - start, K] in `dtype`): each chunk of the kernel
    whole, or in its equal parts of `part_rows` rows (see `sinkhorn.plan_chunks`)."""
    for c, (start, stop) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
      for part_start in range(start, stop, self.part_rows):
        part_stop = min(part_start + self.part_rows, stop)
        yield c, part_start, part_stop, tf.cast(tf.convert_to_tensor(self.head[part_start:part_stop]),
                                                self.dtype)

  def _assemble(self, parts):
    """The kernel's chunks from an iterable of (chunk index, kernel part) in order; each chunk is
    concatenated as soon as its parts are in, so that only one chunk's parts exist beside it."""
    chunks, pending, current = [], [], None
    for c, part in parts:
      if c != current and pending:
        chunks.append(pending[0] if len(pending) == 1 else tf.concat(pending, 0))
        pending = []
      current = c
      pending.append(part)
    if pending:
      chunks.append(pending[0] if len(pending) == 1 else tf.concat(pending, 0))
    return tuple(chunks)

  def _kernel_stats(self, log_alpha):
    log_alpha_t = tf.constant(log_alpha, self.dtype)
    col_offsets, row_max, nonfinite = [], None, 0
    for _, _, _, chunk in self._parts():
      col_offset, chunk_row_max, bad = sinkhorn.kernel_stats(chunk, self.lam, log_alpha_t)
      col_offsets.append(col_offset)
      row_max = chunk_row_max if row_max is None else tf.maximum(row_max, chunk_row_max)
      nonfinite += int(bad)
    return tf.concat(col_offsets, 0), row_max - log_alpha_t, nonfinite

  def check_finite(self, log_alpha) -> int:
    if self.derive_recentrings and callable(getattr(self.head, "nonfinite_inputs", None)):
      # A computed head is checked on what it is computed from (a pass over the features, not a
      # product with them); its first kernel is then built in one pass (`build_kernel`).
      return self.head.nonfinite_inputs()
    return super().check_finite(log_alpha)

  def build_kernel(self, log_alpha):
    if self.derive_recentrings and self._stats is None and self.power is None:
      # No statistics at hand: build around log alpha directly (one pass over the computed head,
      # two only if some cluster's row underflows), not the statistics' pass and then the kernel's.
      self.recentre(log_alpha, _ABSORB_LIMIT[self.storage_dtype])
      return
    self._build_from_statistics(log_alpha)

  def _build_from_statistics(self, log_alpha):
    """The kernel with the offsets of `_kernel_stats` (a pass for them unless `check_finite`'s are at
    hand, then the kernel's): every cluster's row keeps an entry 1, whatever underflows."""
    col_offset, row_offset = self._offsets(log_alpha)
    self.power = None  # the old kernel goes before the new one is built
    probe = tf.zeros([], self.storage_dtype)
    self.power = self._assemble(
        (c, sinkhorn.kernel_chunk(chunk, self.lam, col_offset[start:stop], row_offset, probe))
        for c, start, stop, chunk in self._parts())
    self.col_offset = col_offset.numpy().astype(np.float64)
    self.row_offset = row_offset.numpy().astype(np.float64)
    self.power_lam = self.lam_value
    self._read_at = (-self.row_offset, self.lam_value)

  def recentre(self, log_alpha, absorb_limit):
    """Rebuilds the kernel around `log_alpha`: with `derive_recentrings` from the kernel alone (see
    `sinkhorn.derived_kernel_chunk`), unless a cluster's whole row would underflow there; else in one
    pass over the log-probs (two if a row underflows)."""
    if not (self.derive_recentrings and self.power is not None and self._derive(log_alpha, absorb_limit)):
      self._read_recentred(log_alpha, absorb_limit)

  def _set_kernel(self, power, col_offsets, log_alpha):
    """A re-centred kernel: row_offset = -log alpha."""
    self.power = power
    self.col_offset = tf.concat(col_offsets, 0).numpy().astype(np.float64)
    self.row_offset = -np.asarray(log_alpha, np.float64)
    self.power_lam = self.lam_value

  def _derive(self, log_alpha, absorb_limit) -> bool:
    """The re-centred kernel from the current one; False (and no kernel) where it could miss what the
    kernel lost: entries below float32's range (e^-87 of their example's largest) when it was last read
    from the head. Each stays below e^(-87 + D), D the spread of the centre's move since that read
    (lambda-scaled), so the kernel is derived only while D <= _DERIVE_SPREAD, and where no cluster's
    whole row underflows."""
    read_centre, read_lam = self._read_at
    moved = np.asarray(log_alpha, np.float64) - read_centre * (self.lam_value / read_lam)
    if moved.max() - moved.min() > _DERIVE_SPREAD:
      return False
    log_alpha_t = tf.constant(log_alpha, self.dtype)
    ratio = tf.constant(self.lam_value / self.power_lam, self.dtype)
    row_offset = tf.constant(self.row_offset, self.dtype)
    col_offset = tf.constant(self.col_offset, self.dtype)
    power, col_offsets, row_max = list(self.power), [], None
    self.power = None
    for c, (start, stop) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
      power[c], chunk_col_offset, chunk_row_max = sinkhorn.derived_kernel_chunk(
          power[c], row_offset, col_offset[start:stop], ratio, log_alpha_t)
      col_offsets.append(chunk_col_offset)
      row_max = chunk_row_max if row_max is None else tf.maximum(row_max, chunk_row_max)
    if float(tf.reduce_min(row_max)) < math.exp(-absorb_limit):
      return False
    self._set_kernel(tuple(power), col_offsets, log_alpha)
    return True

  def _read_recentred(self, log_alpha, absorb_limit):
    """The re-centred kernel from the head, in one pass (two if a cluster's row underflows)."""
    log_alpha_t = tf.constant(log_alpha, self.dtype)
    self.power = None
    probe = tf.zeros([], self.storage_dtype)
    col_offsets, row_max = [], [None]

    def parts():
      for c, _, _, chunk in self._parts():
        kernel, col_offset, chunk_row_max = sinkhorn.recentred_kernel_chunk(chunk, self.lam, log_alpha_t,
                                                                            probe)
        col_offsets.append(col_offset)
        row_max[0] = chunk_row_max if row_max[0] is None else tf.maximum(row_max[0], chunk_row_max)
        yield c, kernel

    power = self._assemble(parts())
    if float(tf.reduce_min(row_max[0])) < math.exp(-absorb_limit):
      del power
      self._build_from_statistics(log_alpha)
      return
    self._set_kernel(power, col_offsets, log_alpha)
    self._read_at = (-self.row_offset, self.lam_value)

  def _iterations(self):
    return _solver_for(self.block_rows)

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


class ShardedHeadSolver(HeadSolver):
  """One head's kernel sharded over the replicas of a strategy: each replica holds its rows."""

  def __init__(self, strategy, per_replica_head, lam, dtype, storage_dtype):
    """`per_replica_head`: distributed values, replica r's [N_r, K] log-probabilities of the head."""
    self.strategy = strategy
    self.dtype, self.storage_dtype = dtype, storage_dtype
    self.set_lam(lam)
    self.values = strategy.run(lambda v: tf.cast(v, dtype), args=(per_replica_head,))
    local = strategy.experimental_local_results(self.values)
    self.num_clusters = int(local[0].shape[1])
    self.exchanged_bytes = 0  # all-reduced and gathered payload, per replica (none with one replica)
    self._exchanging = strategy.num_replicas_in_sync > 1
    self.num_examples = int(self._sum(strategy.run(lambda v: tf.shape(v, out_type=tf.int64)[0],
                                                   args=(self.values,))))
    # Each replica's slice is one chunk: the replicas are the parallel units here.
    self.block_rows = max(1, max(int(v.shape[0]) for v in local))
    self._stats = None
    self._loop = None
    self.power = None

  def _sum(self, per_replica):
    result = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    self.exchanged_bytes += self._exchanging * result.dtype.size * max(1, result.shape.num_elements())
    return result

  def _gather(self, per_replica):
    result = self.strategy.gather(per_replica, axis=0)
    self.exchanged_bytes += self._exchanging * result.dtype.size * result.shape.num_elements()
    return result

  def _kernel_stats(self, log_alpha):
    log_alpha_t = tf.constant(log_alpha, self.dtype)
    col_offset, row_max, nonfinite = self.strategy.run(
        sinkhorn.kernel_stats, args=(self.values, self.lam, log_alpha_t))
    # strategy.reduce has no MAX: gather the [K] maxima of all replicas and reduce here.
    stacked = self._gather(self.strategy.run(lambda m: m[None, :], args=(row_max,)))
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
    return self._gather(self._col_offset).numpy().astype(np.float64)

  def recentre(self, log_alpha, absorb_limit):
    del absorb_limit
    self.build_kernel(log_alpha)

  def _iterations(self):
    if self._loop is None:
      one_pass = _pass_for(self.block_rows)
      inv_n = tf.constant(1.0 / self.num_examples, self.dtype)
      strategy = self.strategy

      @tf.function
      def loop(power, row_scale, max_iters, tol, absorb_limit, omega):
        bits = strategy.run(sinkhorn.as_bits, args=(power,))  # views, outside XLA

        def row_sums(r):  # one all-reduce of [K] per iteration
          return strategy.reduce(tf.distribute.ReduceOp.SUM,
                                 strategy.run(one_pass, args=(bits, r, inv_n)), axis=None)
        return sinkhorn.iterations(row_sums, row_scale, max_iters, tol, absorb_limit, omega)

      self._loop = loop
    return self._loop

  def iterate(self, row_scale, max_iters, tol, absorb_limit, omega):
    used, next_row_scale, iterations, error = super().iterate(row_scale, max_iters, tol, absorb_limit,
                                                              omega)
    self.exchanged_bytes += self._exchanging * iterations * self.num_clusters * tf.as_dtype(self.dtype).size
    return used, next_row_scale, iterations, error

  def column_scale(self, row_scale):
    inv_n = tf.constant(1.0 / self.num_examples, self.dtype)
    return self.strategy.run(sinkhorn.column_scale, args=(self.power, row_scale, inv_n))

  def gather(self, col_scale):
    return self._gather(col_scale).numpy()

  def argmax_labels(self, row_scale):
    # int32 across the network: half the bytes of int64 labels.
    labels = self.strategy.run(lambda p, r: tf.cast(sinkhorn.argmax_labels(p, r), tf.int32),
                               args=(self.power, row_scale))
    return self._gather(labels).numpy().astype(np.int64)

  def sample_labels(self, row_scale, seed):
    def replica_sample(power, row_scale):
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      key = tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64), replica)
      return tf.cast(sinkhorn.sample_labels(power, row_scale, key), tf.int32)
    labels = self.strategy.run(replica_sample, args=(self.power, row_scale))
    return self._gather(labels).numpy().astype(np.int64)


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


def device_type(tensor) -> str:
  """'CPU', 'GPU' or 'TPU': where `tensor` lives."""
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
