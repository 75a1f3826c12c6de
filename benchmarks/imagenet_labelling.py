"""The ImageNet label step on one machine: N=1,281,167 features of D=4096, ten heads of K=3000.

Simulated features at the full shape are kept once (bfloat16 by default: 10.5 GB) and every head is
labelled in turn from them (`selabel_tf.label_store.LinearHeads`), as `SelfLabelCallback(
label_store="features")` does. Prints, per head: seconds, iterations, marginal error, cluster sizes;
then the total, and the peak RSS of the process (the issue's budget: 20 GB, 30 minutes).

`--agreement` instead compares, on a subset where both fit (default N=200,000), each head's labels
from the narrow store against a float32 reference: float32 features, float32 log-probabilities,
float32 kernel, every head solved to the same tolerance.

The simulation: 1000 classes with centres mu_c ~ N(0, 0.1^2 I); an example of class c has features
mu_c + N(0, I). Head t maps each cluster k to a class pi_t(k) (3 clusters per class) and has weights
a mu_{pi_t(k)} + a random direction per cluster, so that its softmax is confident (the mean
max-probability is printed; compare with benchmarks/sinkhorn.py's synthetic log-probs).

Run:
  .venv/bin/python benchmarks/imagenet_labelling.py                 # full shape, T=10 (--num_heads=1: one)
  .venv/bin/python benchmarks/imagenet_labelling.py --feature_dir=/local/disk   # the features in a file
  .venv/bin/python benchmarks/imagenet_labelling.py --agreement     # N=200,000 subset, float32 reference
"""

import concurrent.futures
import os
import resource
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from selabel_tf import label_store
from selabel_tf import labeller


def define_flags():
  flags.DEFINE_integer("num_examples", 1_281_167, "N.")
  flags.DEFINE_integer("feature_dim", 4096, "D.")
  flags.DEFINE_integer("num_clusters", 3000, "K per head.")
  flags.DEFINE_integer("num_heads", 10, "T.")
  flags.DEFINE_float("lam", 25.0, "lambda (the paper's ImageNet value).")
  flags.DEFINE_float("tol", labeller.DEFAULT_TOL, "Sinkhorn tolerance.")
  flags.DEFINE_enum("feature_dtype", "bfloat16", label_store.FEATURE_DTYPES, "Stored features.")
  flags.DEFINE_enum("matmul_dtype", "float32", label_store.MATMUL_DTYPES, "The heads' product.")
  flags.DEFINE_enum("storage_dtype", "bfloat16", labeller.STORAGE_DTYPES, "The kernel P^lam.")
  flags.DEFINE_string("feature_dir", "", "A local directory where the features are kept in a file "
                      "(`label_store.FeatureFile`, as bin/train --label_feature_dir) instead of in memory.")
  flags.DEFINE_bool("feature_page_cache", False, "With --feature_dir: let the file's pages stay in the "
                    "page cache (default: dropped once read, as FeatureFile's default).")
  flags.DEFINE_bool("warm", True, "After the cold labelling, label again warm-started from it (the "
                    "labellings after the first of a run), with the weights perturbed slightly.")
  flags.DEFINE_bool("agreement", False, "Compare with a float32 reference on --agreement_examples.")
  flags.DEFINE_integer("agreement_examples", 200_000, "N of the --agreement subset.")
  flags.DEFINE_integer("agreement_heads", 3, "Heads compared with --agreement.")
  flags.DEFINE_integer("seed", 0, "Seed of the simulation.")


_CLASSES = 1000
# Rows simulated at a time (numpy: the simulation's temporaries are the C allocator's, returned when freed,
# and none of it stays in TF's CPU allocator pool beside the labelling, as a TF simulation's would).
_SIMULATION_ROWS = 2048


def peak_rss_gib():
  """Peak resident set size of this process, GiB (ru_maxrss is in KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def simulate(num_examples, dim, num_clusters, num_heads, feature_dtype, seed, feature_dir="",
             page_cache=False):
  """(features [N, D] in feature_dtype, kernels T x [D, K] float32, biases, classes [N]).

  The features are a numpy array, or with `feature_dir` a `label_store.FeatureFile` there.

  The heads' weights are float32 tensors, which `label_store.LinearHeads` reads without a copy: ten heads
  of [4096, 3000] are 0.46 GiB, held once (numpy originals beside TF's copies would hold them twice)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(scale=0.1, size=(_CLASSES, dim)).astype(np.float32)
  classes = rng.integers(0, _CLASSES, num_examples)
  dtype = tf.as_dtype(feature_dtype).as_numpy_dtype
  features = (label_store.FeatureFile(feature_dir, (num_examples, dim), dtype, page_cache=page_cache)
              if feature_dir
              else np.empty((num_examples, dim), dtype))

  def simulate_rows(start):  # numpy releases the GIL while drawing: the parts run on every core
    stop = min(start + _SIMULATION_ROWS, num_examples)
    part = np.random.default_rng([seed, start]).standard_normal((stop - start, dim), np.float32)
    part += centres[classes[start:stop]]
    features[np.arange(start, stop)] = part

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(simulate_rows, range(0, num_examples, _SIMULATION_ROWS)))
  kernels, biases = [], []
  for t in range(num_heads):
    head_rng = np.random.default_rng([seed, t + 1])
    owner = head_rng.permutation(np.arange(num_clusters) % _CLASSES)
    directions = head_rng.normal(scale=0.02, size=(dim, num_clusters)).astype(np.float32)
    kernels.append(tf.constant(0.5 * centres[owner].T + directions))
    biases.append(tf.zeros([num_clusters], tf.float32))
  return features, kernels, biases, classes


def mean_max_prob(head, rows=65536, part=2048):
  """The mean over the first `rows` examples of a head's largest probability, read `part` rows at a time
  (TF's CPU allocator keeps the memory a temporary once took: a larger read would leave more in its pool
  beside the labelling)."""
  rows = min(rows, head.shape[0])
  total = sum(float(tf.reduce_sum(tf.exp(tf.reduce_max(head[start:min(start + part, rows)], axis=1))))
              for start in range(0, rows, part))
  return total / rows


def label(heads, warm_start=None, name="cold"):
  """Labels every head in turn; prints per head and the total; returns the assignments."""
  results, total = [], 0.0
  for t in range(len(heads)):
    start = time.perf_counter()
    result = labeller.assign_labels([heads[t]], flags.FLAGS.lam, tol=flags.FLAGS.tol,
                                    storage_dtype=flags.FLAGS.storage_dtype, log_every=50,
                                    warm_start=None if warm_start is None else [warm_start[t]])
    seconds = time.perf_counter() - start
    total += seconds
    sizes = result.cluster_sizes(0)
    print(f"  {name} head {t + 1}/{len(heads)}: {seconds:.1f} s, {int(result.iterations[0])} iterations, "
          f"marginal error {result.marginal_error[0]:.3g}, cluster sizes {sizes.min()}..{sizes.max()}, "
          f"peak RSS so far {peak_rss_gib():.1f} GiB", flush=True)
    results.append(result)
  print(f"{name}: all {len(heads)} heads in {total:.1f} s ({total / 60:.1f} min)", flush=True)
  return results


def run_full():
  f = flags.FLAGS
  start = time.perf_counter()
  features, kernels, biases, _ = simulate(f.num_examples, f.feature_dim, f.num_clusters, f.num_heads,
                                          f.feature_dtype, f.seed, f.feature_dir, f.feature_page_cache)
  where = f"in a file in {f.feature_dir}" if f.feature_dir else "in memory"
  print(f"simulated features {features.shape} {f.feature_dtype} ({features.nbytes / 1e9:.1f} GB, {where}) "
        f"in {time.perf_counter() - start:.0f} s; peak RSS {peak_rss_gib():.1f} GiB", flush=True)
  heads = label_store.LinearHeads(features, kernels, biases, matmul_dtype=f.matmul_dtype)
  print(f"mean max-probability (first 65536 examples, head 1): {mean_max_prob(heads[0]):.3f}")
  formula = label_store.store_bytes(f.num_examples, [f.num_clusters] * f.num_heads, f.feature_dim,
                                    "features", f.feature_dtype, f.storage_dtype,
                                    features_in_file=bool(f.feature_dir))
  terms = "N*K*s_kernel (the features in a file)" if f.feature_dir else "N*D*s_features + N*K*s_kernel"
  print(f"formula {terms} = {formula / 2**30:.1f} GiB; the log-probs store would "
        f"hold {label_store.store_bytes(f.num_examples, [f.num_clusters] * f.num_heads, f.feature_dim, 'log_probs') / 2**30:.0f} GiB",
        flush=True)
  cold = label(heads)
  if f.warm:
    rng = np.random.default_rng(f.seed + 100)
    moved = label_store.LinearHeads(features, [k + rng.normal(scale=0.002, size=k.shape).astype(np.float32)
                                               for k in kernels], biases, matmul_dtype=f.matmul_dtype)
    warm = label(moved, [r.log_row_scale[0] for r in cold], name="warm")
    changed = np.mean([np.mean(w.labels[0] != c.labels[0]) for w, c in zip(warm, cold)])
    print(f"warm: labels changed by the perturbation {changed:.3f}")
  print(f"peak RSS of the whole run: {peak_rss_gib():.1f} GiB = {peak_rss_gib() * 2**30 / 1e9:.1f} GB "
        f"(budget 20 GB); CPU threads "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}", flush=True)
  heads.close()


def run_agreement():
  f = flags.FLAGS
  n, heads_compared = f.agreement_examples, f.agreement_heads
  features, kernels, biases, _ = simulate(n, f.feature_dim, f.num_clusters, heads_compared, "float32",
                                          f.seed)
  reference_heads = label_store.LinearHeads(features, kernels, biases, matmul_dtype="float32")
  narrow = features.astype(tf.as_dtype(f.feature_dtype).as_numpy_dtype)
  narrow_heads = label_store.LinearHeads(narrow, kernels, biases, matmul_dtype=f.matmul_dtype)
  print(f"N={n} D={f.feature_dim} K={f.num_clusters} lam={f.lam}; mean max-probability "
        f"{mean_max_prob(reference_heads[0]):.3f}", flush=True)
  for t in range(heads_compared):
    stored = reference_heads[t][0:n].numpy()
    start = time.perf_counter()
    reference = labeller.assign_labels([stored], f.lam, tol=f.tol, storage_dtype="float32")
    reference_seconds = time.perf_counter() - start
    del stored
    start = time.perf_counter()
    result = labeller.assign_labels([narrow_heads[t]], f.lam, tol=f.tol, storage_dtype=f.storage_dtype)
    seconds = time.perf_counter() - start
    agreement = float(np.mean(result.labels[0] == reference.labels[0]))
    print(f"head {t + 1}: {f.feature_dtype} features, {f.matmul_dtype} matmul, {f.storage_dtype} kernel: "
          f"{agreement * 100:.2f}% of labels equal the float32 reference's ({seconds:.1f} s, "
          f"{int(result.iterations[0])} iterations; reference {reference_seconds:.1f} s, "
          f"{int(reference.iterations[0])} iterations)", flush=True)


def main(argv):
  del argv
  print(f"TensorFlow {tf.__version__}")
  if flags.FLAGS.agreement:
    run_agreement()
  else:
    run_full()


if __name__ == "__main__":
  define_flags()
  app.run(main)
