"""Benchmark of the Sinkhorn-Knopp labeller against the memory-bandwidth limit and a numpy reference.

Prints, in one run and per shape:
  * the input's mean max-probability (so that runs are comparable: iteration counts depend on it);
  * ms per iteration of selabel_tf (per storage dtype), and of one multi-threaded streaming read of
    the K x N float32 matrix (XLA reduce_sum): the memory-bandwidth limit;
  * ms per iteration of a float64 numpy reference following the official update rule (two
    matrix-vector products per iteration) on the same matrix;
  * the ratios selabel_tf / one read and reference / selabel_tf;
  * end-to-end time to tolerance of both, with the same stopping criterion;
  * the fraction of argmax labels that differ from a fully converged solution, per tolerance.

Run (unset OPENBLAS_* in this command only, so that numpy's BLAS runs at its best):
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/sinkhorn.py
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/sinkhorn.py --imagenet
"""

import math
import resource
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from selabel_tf import labeller
from selabel_tf import solvers


def define_flags():
  flags.DEFINE_bool("imagenet", False, "Only the ImageNet shape N=1,281,167, K=3000, one head, "
                    "log-probs generated chunk by chunk (they never exist whole in memory).")
  flags.DEFINE_list("shapes", ["500000x1000x1@25", "50000x128x10@10"],
                    "Shapes NxKxT@lam to run (ignored with --imagenet).")
  flags.DEFINE_list("storage_dtypes", ["float32", "float16", "bfloat16"],
                    "Storage dtypes of P^lam to time.")
  flags.DEFINE_list("imagenet_storage_dtypes", ["bfloat16"],
                    "Storage dtypes run with --imagenet (float32 needs 15.4 GB for the kernel alone).")
  flags.DEFINE_list("tolerances", ["0.3", "0.1", "0.03", "0.01"],
                    "Tolerances for the label-stability table (the default tol is among them).")
  flags.DEFINE_float("converged_tol", 3e-3, "Tolerance of the 'fully converged' reference labels.")
  flags.DEFINE_integer("timing_iters", 20, "Iterations timed per ms/iteration figure.")
  flags.DEFINE_integer("reference_max_seconds", 300, "Cap on the numpy reference's run to tolerance.")
  flags.DEFINE_integer("seed", 0, "Seed of the synthetic log-probs.")


class SyntheticLogProbs:
  """Log-probabilities shaped like a trained network's, generated on demand for any row range.

  Each example has a 'true' cluster drawn with uneven (Zipf, exponent 0.25) popularity; its logits are
  uniform noise of standard deviation 2 plus a margin on the true cluster, so that softmax is confident
  (mean max-prob around 0.7). Every value is a hash of (seed, row, column), computed by one XLA
  function: any slicing returns the same values, the whole matrix never needs to exist in memory, and
  a pass over it costs about as much as reading a stored copy would (the labeller reads its input
  once per kernel build).
  """

  def __init__(self, num_examples, num_clusters, seed):
    self.shape = (num_examples, num_clusters)
    self._seed = seed
    popularity = np.arange(1, num_clusters + 1) ** -0.25
    self._cumulative_popularity = tf.constant(np.cumsum(popularity / popularity.sum()), tf.float32)
    self._margin = math.log(num_clusters) + 2.0  # about log E[sum_k exp(noise_k)]: max-prob near 0.5 ...

  @staticmethod
  def _uniform(*keys):
    """A hash of uint32 tensors (broadcast) to floats in (0, 1): murmur3's finaliser."""
    h = tf.constant(0x9E3779B9, tf.uint32)
    for i, key in enumerate(keys):
      h = h + key * tf.constant((0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1)[i % 4], tf.uint32)
      h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(15, tf.uint32)))
    h = h * tf.constant(0x85EBCA6B, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(13, tf.uint32)))
    h = h * tf.constant(0xC2B2AE35, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))
    bits = tf.bitwise.right_shift(h, tf.constant(8, tf.uint32))
    return (tf.cast(bits, tf.float32) + 0.5) * (1.0 / (1 << 24))

  @tf.function(jit_compile=True)
  def _logits(self, start, num_rows):
    num_clusters = self.shape[1]
    seed = tf.cast(self._seed, tf.uint32)
    rows = tf.cast(start + tf.range(num_rows), tf.uint32)
    true = tf.minimum(tf.searchsorted(self._cumulative_popularity, self._uniform(seed, rows, 1 + 0 * rows),
                                      side="right"), num_clusters - 1)
    # ... a per-example extra margin of N(1.5, 1.5) (Box-Muller) makes it confident, unevenly so.
    u1, u2 = self._uniform(seed, rows, 2 + 0 * rows), self._uniform(seed, rows, 3 + 0 * rows)
    normal = tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos(2.0 * math.pi * u2)
    margin = self._margin + 1.5 + 1.5 * normal
    # Uniform noise of standard deviation 2.
    columns = tf.cast(tf.range(num_clusters), tf.uint32)
    noise = (self._uniform(seed, rows[:, None], columns[None, :] + 4) - 0.5) * (4.0 * 3**0.5)
    return noise + margin[:, None] * tf.one_hot(true, num_clusters)

  def __getitem__(self, rows):
    start, stop, _ = rows.indices(self.shape[0])
    # The row count is static (one XLA compile per distinct count; the labeller's chunks have 1-2).
    # (Two XLA calls: fused into one, the hash would be recomputed by each reduction of log_softmax.)
    return _log_softmax(self._logits(tf.constant(start, tf.int32), stop - start))

  def materialize(self):
    return np.concatenate([self[s:s + (1 << 16)].numpy() for s in range(0, self.shape[0], 1 << 16)])


@tf.function(jit_compile=True)
def _log_softmax(logits):
  return tf.nn.log_softmax(logits, axis=1)


def mean_max_prob(head):
  total = 0.0
  for s in range(0, head.shape[0], 1 << 16):
    total += float(tf.reduce_sum(tf.exp(tf.reduce_max(head[s:s + (1 << 16)], axis=1))))
  return total / head.shape[0]


def peak_rss_gb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@tf.function(jit_compile=True)
def one_read(chunks):
  """One streaming read of every chunk: the sum of all entries, widened to float32 block by block (a
  whole-chunk widening would materialise a float32 copy of a narrow kernel)."""
  total = []
  for chunk in chunks:
    if chunk.dtype == tf.float32:  # nothing to widen: XLA's plain reduction is the fastest read
      total.append(tf.reduce_sum(chunk))
      continue
    rows, num_clusters = chunk.shape
    block = min(rows, max(8, (1 << 20) // (num_clusters * chunk.dtype.size)))

    def body(j, acc, chunk=chunk, rows=rows, num_clusters=num_clusters, block=block):
      offset = tf.minimum(j * block, rows - block)
      part = tf.cast(tf.slice(chunk, [offset, 0], [block, num_clusters]), tf.float32)
      fresh = tf.cast(tf.range(block) + offset >= j * block, tf.float32)
      return j + 1, acc + tf.reduce_sum(part * fresh[:, None], axis=0)

    _, acc = tf.while_loop(lambda j, _: j < math.ceil(rows / block), body,
                           (tf.constant(0), tf.zeros([num_clusters])))
    total.append(tf.reduce_sum(acc))
  return tf.add_n(total)


def timed(fn, reps):
  """Median wall time of fn() over reps runs after one warm-up, in seconds."""
  fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def prepare(head, lam, storage_dtype):
  """The kernel P^lam as the labeller holds it: (tuple of row chunks, block_rows)."""
  solver = solvers.LocalHeadSolver(head, lam, "float32", storage_dtype, "CPU")
  solver.build_kernel(np.zeros(head.shape[1]))
  return solver.power, solver.block_rows


def selabel_ms_per_iter(power, block_rows, iters):
  solve = solvers._solver_for(block_rows)  # pylint: disable=protected-access
  num_clusters = int(power[0].shape[1])
  r = tf.fill([num_clusters], 1.0 / num_clusters)
  zero_tol, no_limit = tf.constant(0.0), tf.constant(np.inf, tf.float32)
  n = tf.constant(iters)
  omega = tf.constant(labeller.DEFAULT_OVER_RELAXATION)
  return timed(lambda: solve(power, r, n, zero_tol, no_limit, omega)[3].numpy(), reps=3) / iters * 1e3


class Reference:
  """The official update rule in float64 numpy: P = exp(log_probs)^lam (K x N), two matvecs/iter."""

  def __init__(self, head, lam):
    self.power = np.exp(lam * np.asarray(head, np.float64)).T.copy()  # K x N, as the official code
    self.num_clusters, self.num_examples = self.power.shape

  def iterate(self, r, c):
    r = (1.0 / self.num_clusters) / (self.power @ c)
    c = (1.0 / self.num_examples) / (r @ self.power)
    return r, c

  def ms_per_iter(self, iters):
    r = np.full(self.num_clusters, 1.0 / self.num_clusters)
    c = np.full(self.num_examples, 1.0 / self.num_examples)

    def run():
      rr, cc = r, c
      for _ in range(iters):
        rr, cc = self.iterate(rr, cc)
    return timed(run, reps=1) / iters * 1e3

  def solve(self, tol, max_seconds):
    """Iterates until max_k |r_k / r_next_k - 1| <= tol, the same cluster-marginal criterion."""
    c = np.full(self.num_examples, 1.0 / self.num_examples)
    r = (1.0 / self.num_clusters) / (self.power @ c)
    start, iters = time.perf_counter(), 0
    while time.perf_counter() - start < max_seconds:
      c = (1.0 / self.num_examples) / (r @ self.power)
      iters += 1
      r_next = (1.0 / self.num_clusters) / (self.power @ c)
      if np.max(np.abs(r / r_next - 1)) <= tol:
        return iters, time.perf_counter() - start, np.argmax(r[:, None] * self.power, axis=0)
      r = r_next
    return iters, None, None


def label_stability(head, lam, tolerances, converged_tol):
  """Fraction of labels differing from a converged solution, per tol (continuing warm, cumulatively)."""
  rows, previous, total_iters, total_time = [], None, 0, 0.0
  for tol in sorted(tolerances, reverse=True) + [converged_tol]:
    start = time.perf_counter()
    result = labeller.assign_labels([head], lam, tol=tol, max_iters=6000, warm_start=previous,
                                    log_every=500)
    total_time += time.perf_counter() - start
    total_iters += int(result.iterations[0])
    rows.append((tol, total_iters, total_time, result.labels[0], float(result.marginal_error[0])))
    previous = result
  converged = rows[-1][3]
  print("  tol      iterations  time(s)  marginal_err  labels differing from tol=%g" % converged_tol)
  for tol, iters, seconds, labels, err in rows[:-1]:
    print(f"  {tol:<8g} {iters:>10d} {seconds:>8.1f}  {err:>12.3g}  {np.mean(labels != converged):.4%}")
  print(f"  {converged_tol:<8g} {rows[-1][1]:>10d} {rows[-1][2]:>8.1f}  {rows[-1][4]:>12.3g}  (reference)")


def run_shape(num_examples, num_clusters, num_heads, lam):
  print(f"\n=== N={num_examples} K={num_clusters} T={num_heads} lam={lam} ===", flush=True)
  source = SyntheticLogProbs(num_examples, num_clusters, flags.FLAGS.seed)
  head = source.materialize()  # stored log-probs, float32 [N, K], as after a label pass
  print(f"mean max-probability: {mean_max_prob(head):.3f}")
  gb = num_examples * num_clusters * 4 / 1e9
  power, block_rows = prepare(head, lam, "float32")
  read_ms = timed(lambda: one_read(power).numpy(), reps=5) * 1e3
  print(f"one streaming read of the K x N float32 matrix ({gb:.2f} GB): {read_ms:.1f} ms "
        f"({gb / read_ms * 1e3:.1f} GB/s)")
  per_iter = {}
  for storage_dtype in flags.FLAGS.storage_dtypes:
    p, rows = (power, block_rows) if storage_dtype == "float32" else prepare(head, lam, storage_dtype)
    per_iter[storage_dtype] = selabel_ms_per_iter(p, rows, flags.FLAGS.timing_iters)
    print(f"selabel_tf, {storage_dtype} storage: {per_iter[storage_dtype]:.1f} ms/iteration "
          f"= {per_iter[storage_dtype] / read_ms:.2f} x one read")
    del p
  del power

  reference = Reference(head, lam)
  ref_ms = reference.ms_per_iter(max(2, flags.FLAGS.timing_iters // 4))
  print(f"float64 numpy reference (official rule, 2 matvecs): {ref_ms:.1f} ms/iteration")
  for storage_dtype, ms in per_iter.items():
    print(f"reference / selabel_tf ({storage_dtype}): {ref_ms / ms:.1f} x per iteration")

  tol = labeller.DEFAULT_TOL
  heads = [head] * num_heads
  labeller.assign_labels([head], lam, tol=tol, max_iters=3)  # compile for this shape
  for storage_dtype in flags.FLAGS.storage_dtypes:
    start = time.perf_counter()
    result = labeller.assign_labels(heads, lam, tol=tol, storage_dtype=storage_dtype, log_every=500)
    seconds = time.perf_counter() - start
    print(f"selabel_tf end to end, {num_heads} head(s), {storage_dtype}, tol={tol}: {seconds:.1f} s, "
          f"iterations {result.iterations.tolist()}")
    if storage_dtype == "float32":
      labels32 = result.labels[0]
    else:
      print(f"  labels differing from float32 storage: {np.mean(result.labels[0] != labels32):.4%}")
  ref_iters, ref_seconds, ref_labels = reference.solve(tol, flags.FLAGS.reference_max_seconds)
  if ref_seconds is None:
    print(f"reference to tol={tol}: not reached in {flags.FLAGS.reference_max_seconds} s "
          f"({ref_iters} iterations)")
  else:
    print(f"reference to tol={tol}, one head: {ref_seconds:.1f} s, {ref_iters} iterations "
          f"(x{num_heads} heads: {ref_seconds * num_heads:.1f} s); labels differing from "
          f"selabel_tf float32: {np.mean(ref_labels != labels32):.4%}")
  del reference
  print("label stability (head 0, float32, warm-continued):")
  label_stability(head, lam, [float(t) for t in flags.FLAGS.tolerances], flags.FLAGS.converged_tol)


def run_imagenet():
  """The ImageNet shape, to tolerance, with the storage dtypes of --imagenet_storage_dtypes.

  The float32 kernel alone is 15.4 GB; the log-probs are generated chunk by chunk from a lazy source
  (as a memory-mapped store of a real label pass would be read), never whole in memory.
  """
  num_examples, num_clusters, lam = 1_281_167, 3000, 25.0
  print(f"\n=== ImageNet shape: N={num_examples} K={num_clusters} T=1 lam={lam} ===", flush=True)
  source = SyntheticLogProbs(num_examples, num_clusters, flags.FLAGS.seed)
  print(f"mean max-probability (first 65536 examples): {mean_max_prob(source[0:65536]):.3f}")
  for storage_dtype in flags.FLAGS.imagenet_storage_dtypes:
    gb = num_examples * num_clusters * tf.as_dtype(storage_dtype).size / 1e9
    start = time.perf_counter()
    result = labeller.assign_labels([source], lam, storage_dtype=storage_dtype, log_every=50)
    seconds = time.perf_counter() - start
    sizes = result.cluster_sizes(0)
    print(f"selabel_tf, {storage_dtype} storage ({gb:.1f} GB kernel), tol={result.tol}: {seconds:.1f} s "
          f"end to end (including generating the log-probs for every kernel build), "
          f"{int(result.iterations[0])} iterations, marginal error {result.marginal_error[0]:.3g}, "
          f"cluster sizes {sizes.min()}..{sizes.max()} (N/K={num_examples / num_clusters:.0f}), "
          f"peak RSS so far {peak_rss_gb():.1f} GB", flush=True)
    del result
    power, block_rows = prepare(source, lam, storage_dtype)
    read_ms = timed(lambda: one_read(power).numpy(), reps=3) * 1e3
    ms = selabel_ms_per_iter(power, block_rows, 5)
    print(f"  one streaming read of the {storage_dtype} kernel: {read_ms:.0f} ms ({gb / read_ms * 1e3:.1f} "
          f"GB/s); selabel_tf: {ms:.0f} ms/iteration = {ms / read_ms:.2f} x that read; a read of the "
          f"float32 P at that rate: {read_ms * 4 / tf.as_dtype(storage_dtype).size:.0f} ms", flush=True)
    del power
  print(f"peak RSS of the whole run: {peak_rss_gb():.1f} GB (limit 20 GB)")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  print(f"TensorFlow {tf.__version__}, intra-op threads: "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}")
  if flags.FLAGS.imagenet:
    run_imagenet()
    return
  for spec in flags.FLAGS.shapes:
    dims, lam = spec.split("@")
    num_examples, num_clusters, num_heads = (int(x) for x in dims.split("x"))
    run_shape(num_examples, num_clusters, num_heads, float(lam))


if __name__ == "__main__":
  define_flags()
  app.run(main)
