"""Benchmark of the K-means pseudo-labels (`selabel_tf.kmeans`, the paper's "ours (K-means)").

Prints, for one head on simulated features:
  * the CPU model, faiss' OpenMP thread count and the resident memory after the imports;
  * the seconds of the two steps of `assign_labels_kmeans`: `preprocess_features` (whitened PCA and L2
    normalisation; with --imagenet this includes generating the simulated rows, timed on its own too)
    and faiss K-means (training iterations and the final assignment);
  * the current and the peak resident memory (psutil, getrusage) after each step;
  * the inertia, the cluster sizes, and the NMI of the labels against the simulated classes.

The default shape is MNIST-sized (N=60,000, D=4096, K=10), held in memory; for it the benchmark also
runs `assign_labels_kmeans` end to end and checks that it returns the labels of the two steps. With
--imagenet the shape is ImageNet's (N=1,281,167, D=4096, K=3000): the features (21 GB at float32)
never exist whole; they are generated row by row on demand, the PCA trains on --pca_sample_size rows
and projects the rest chunk by chunk into a float32 [N, pca_dim] array.

Run:
  .venv/bin/python benchmarks/kmeans.py
  .venv/bin/python benchmarks/kmeans.py --imagenet
"""

import os
import resource
import subprocess
import time

from absl import app
from absl import flags
import faiss
import numpy as np
import psutil
from sklearn import metrics
import threadpoolctl

from selabel_tf import kmeans

_IMAGENET_SHAPE = dict(num_examples=1_281_167, dim=4096, num_clusters=3000, num_classes=1000,
                       pca_sample_size=100_000)


def define_flags():
  flags.DEFINE_bool("imagenet", False, "Run the ImageNet shape N=1,281,167, D=4096, K=3000 with rows "
                    "generated on demand (overrides the shape flags).")
  flags.DEFINE_integer("num_examples", 60_000, "N, the number of feature rows.")
  flags.DEFINE_integer("dim", 4096, "D, the feature dimension (a multiple of 8).")
  flags.DEFINE_integer("num_clusters", 10, "K of the one head.")
  flags.DEFINE_integer("num_classes", 10, "Number of simulated classes (mixture components).")
  flags.DEFINE_integer("pca_sample_size", None, "Rows the PCA trains on (default: all; with "
                       "--imagenet, 100,000).")
  flags.DEFINE_integer("pca_dim", 256, "PCA output dimensions.")
  flags.DEFINE_integer("num_iterations", 20, "K-means iterations.")
  flags.DEFINE_integer("threads", 0, "faiss OpenMP threads for the run (0: faiss' default); restored "
                       "afterwards.")
  flags.DEFINE_bool("verbose", False, "Print faiss' per-iteration K-means log.")
  flags.DEFINE_integer("seed", 0, "Seed of the simulated features, the PCA sample and K-means.")


class SimulatedFeatures:
  """float32 [N, D] rows of a mixture: global mean + class mean + uniform noise, generated on demand.

  Row r belongs to class `classes[r]` (uniform over `num_classes`); its value is a fixed non-negative
  offset (features after a ReLU have a large mean) plus its class mean (Gaussian, unit variance per
  dimension) plus noise uniform in [-sqrt(3), sqrt(3)) (unit variance). The noise of row r comes from a
  Philox stream whose counter starts at row r's own offset, so every row is the same however the rows
  are indexed (slices or integer arrays) and the matrix never needs to exist whole. The time spent
  generating is added up in `seconds`.
  """

  def __init__(self, num_examples, dim, num_classes, seed):
    if dim % 8:
      raise ValueError(f"dim must be a multiple of 8 (8 float32 per Philox counter step), got {dim}")
    self.shape = (num_examples, dim)
    self.dtype = np.dtype(np.float32)
    self.seconds = 0.0
    rng = np.random.default_rng(seed)
    self.classes = rng.integers(0, num_classes, size=num_examples)
    offset = rng.uniform(0.0, 3.0, size=dim)
    self._class_values = (offset + rng.normal(size=(num_classes, dim))).astype(np.float32)
    self._key = seed

  def _rows(self, start, count):
    """float32 [count, D]: rows start..start+count-1."""
    dim = self.shape[1]
    generator = np.random.Generator(np.random.Philox(counter=start * dim // 8, key=self._key))
    rows = generator.random((count, dim), dtype=np.float32)
    rows -= 0.5
    rows *= np.float32(np.sqrt(12.0))
    rows += self._class_values[self.classes[start:start + count]]
    return rows

  def __getitem__(self, index):
    start_time = time.perf_counter()
    if isinstance(index, slice):
      start, stop, step = index.indices(self.shape[0])
      if step != 1:
        raise ValueError(f"SimulatedFeatures: only contiguous slices, got step {step}")
      rows = self._rows(start, max(0, stop - start))
    else:
      index = np.asarray(index)
      rows = np.empty((index.shape[0], self.shape[1]), np.float32)
      for i, row in enumerate(index):
        rows[i] = self._rows(int(row), 1)[0]
    self.seconds += time.perf_counter() - start_time
    return rows


def cpu_model():
  try:
    output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return "unknown (lscpu failed)"
  for line in output.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return "unknown (no 'Model name' in lscpu)"


def memory():
  """'current / peak' resident memory of this process in GiB."""
  current = psutil.Process().memory_info().rss / 2**30
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  return f"RSS {current:.2f} GiB, peak {peak:.2f} GiB"


def describe_labels(labels, num_clusters, classes, inertia):
  sizes = np.bincount(labels, minlength=num_clusters)
  nmi = metrics.normalized_mutual_info_score(classes, labels)
  return (f"inertia {inertia:.6g}; cluster sizes min {sizes.min()} / median {int(np.median(sizes))} / "
          f"max {sizes.max()}, {int(np.count_nonzero(sizes == 0))} empty; NMI vs simulated classes "
          f"{nmi:.4f}")


def run(num_examples, dim, num_clusters, num_classes, pca_sample_size, in_memory):
  config = flags.FLAGS
  print(f"shape N={num_examples:,} D={dim} K={num_clusters} (one head), {num_classes} simulated "
        f"classes, pca_dim={config.pca_dim}, pca_sample_size={pca_sample_size or 'all rows'}, "
        f"niter={config.num_iterations}, seed={config.seed}")
  simulated = SimulatedFeatures(num_examples, dim, num_classes, config.seed)
  features = simulated
  if in_memory:
    start = time.perf_counter()
    features = simulated[0:num_examples]
    print(f"  simulated features float32 [{num_examples}, {dim}] generated in "
          f"{time.perf_counter() - start:.1f} s ({features.nbytes / 2**30:.2f} GiB); {memory()}")

  start = time.perf_counter()
  preprocessed = kmeans.preprocess_features(features, pca_dim=config.pca_dim,
                                            pca_sample_size=pca_sample_size, seed=config.seed)
  preprocess_seconds = time.perf_counter() - start
  generated = "" if in_memory else f" (of which generating rows on demand: {simulated.seconds:.1f} s)"
  print(f"  preprocess_features (PCA {dim}->{preprocessed.shape[1]}, whiten, L2): "
        f"{preprocess_seconds:.1f} s{generated}; {memory()}")

  start = time.perf_counter()
  # The K-means step of assign_labels_kmeans, on its own.
  labels, inertia = kmeans._kmeans_labels(  # pylint: disable=protected-access
      preprocessed, num_clusters, seed=config.seed, num_iterations=config.num_iterations,
      verbose=config.verbose)
  kmeans_seconds = time.perf_counter() - start
  print(f"  faiss K-means ({config.num_iterations} iterations + final assignment): "
        f"{kmeans_seconds:.1f} s; {memory()}")
  print(f"  assign_labels_kmeans = the two steps: {preprocess_seconds + kmeans_seconds:.1f} s")
  print(f"  {describe_labels(labels, num_clusters, simulated.classes, inertia)}")
  del preprocessed

  if in_memory:
    assignment = kmeans.assign_labels_kmeans(features, (num_clusters,), pca_dim=config.pca_dim,
                                             num_iterations=config.num_iterations, seed=config.seed,
                                             pca_sample_size=pca_sample_size)
    same = np.array_equal(assignment.labels[0], labels)
    print(f"  assign_labels_kmeans end to end: {assignment.seconds:.1f} s, labels equal to the two "
          f"steps': {same}; {memory()}")


def main(argv):
  del argv
  config = flags.FLAGS
  blas = [f"{os.path.basename(os.path.dirname(info['filepath']))} {info['internal_api']} "
          f"{info['num_threads']} threads"
          for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
  coretype = os.environ.get("OPENBLAS_CORETYPE")
  print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; faiss {faiss.__version__} (K-means), "
        f"OpenMP threads {config.threads or faiss.omp_get_max_threads()}; numpy {np.__version__} "
        f"(PCA), BLAS: {', '.join(blas)}{f', OPENBLAS_CORETYPE={coretype}' if coretype else ''}")
  print(f"after imports (TensorFlow comes with the selabel_tf package): {memory()}")
  default_threads = faiss.omp_get_max_threads()
  if config.threads:
    faiss.omp_set_num_threads(config.threads)
  try:
    if config.imagenet:
      shape = dict(_IMAGENET_SHAPE)
      if config.pca_sample_size:
        shape["pca_sample_size"] = config.pca_sample_size
      run(**shape, in_memory=False)
    else:
      run(config.num_examples, config.dim, config.num_clusters, config.num_classes,
          config.pca_sample_size, in_memory=True)
  finally:
    faiss.omp_set_num_threads(default_threads)


if __name__ == "__main__":
  define_flags()
  app.run(main)
