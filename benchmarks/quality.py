"""The quality table: SeLa (Sinkhorn-Knopp) against the K-means labeller, supervised training, an untrained
network and raw pixels, on the full and the imbalanced train sets (paper Table 8), in one command.

For every --imbalance (none: the full train set; light; heavy) it runs, one after another:
  sela        bin/train --flagfile=F                       (the Sinkhorn-Knopp labeller)
  sela_sk_only  only when --rows names it: the same with --cold_start_labeller=same
              --labeller_cold_start_balance=exact, Sinkhorn-Knopp at every labelling, the first one too
              (F's K-means cold start otherwise gives the sela and kmeans rows the same first labelling, so
              at a budget of few labellings they share much of their training)
  kmeans      bin/train --flagfile=F --labeller=kmeans     (Table 8's K-means labeller, same budget)
  supervised  bin/train --flagfile=F --supervised          (one head on the class labels, same budget)
  random_init bin/evaluate --run_dir=<sela> --random_init  (the same network, untrained)
  pixels      weighted kNN (cosine, sigma 0.1) and logistic regression on raw pixels, K-means (K = classes)
each evaluated on the full test split by the library's own evaluation (kNN, linear probes, cluster
metrics of the first head), and prints one table: seeds, wall times and each run's budget in
supervised-epoch units (its wall time over one epoch of the supervised run of the same imbalance, so
that the units compare across machines).

Run (configs/fashion_mnist_table8.cfg: the default job's recipe at the issue's Table 8 budget, at most 3
supervised-epoch units per run; about an hour per train set on a 2-core CPU):
  .venv/bin/python benchmarks/quality.py
The default job's budget instead: --flagfile_under_test=configs/fashion_mnist.cfg.
A quick screen of a recipe on a subset (a proxy: other numbers, same ranking so far):
  .venv/bin/python benchmarks/quality.py --imbalance=none --rows=sela,random_init,pixels \
      --extra=--train_subset=10000 --extra=--probe_epochs=5 --out_dir=runs/quality_proxy
"""

import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROWS = ("sela", "sela_sk_only", "kmeans", "supervised", "random_init", "pixels")
_TRAIN_FLAGS = {"sela": [],
                "sela_sk_only": ["--cold_start_labeller=same", "--labeller_cold_start_balance=exact"],
                "kmeans": ["--labeller=kmeans"], "supervised": ["--supervised"]}

flags.DEFINE_string("flagfile_under_test", "configs/fashion_mnist_table8.cfg",
                    "The bin/train flagfile of every run (default: Table 8 at <= 3 units per run).")
flags.DEFINE_list("imbalance", ["none", "light", "heavy"], "Train sets: none (full), light, heavy.")
flags.DEFINE_list("rows", [row for row in ROWS if row != "sela_sk_only"],
                  f"Which of {ROWS} to run (default: all but sela_sk_only).")
flags.DEFINE_multi_string("extra", [], "An extra bin/train flag for every run (repeat for more).")
flags.DEFINE_string("out_dir", "runs/quality", "Where the run directories go.")
flags.DEFINE_integer("seed", 0, "--seed of every run.")
flags.DEFINE_bool("reuse", True, "Reuse a finished run directory (metrics.json present) instead of rerunning.")
FLAGS = flags.FLAGS


def _run(command, log_path):
  start = time.perf_counter()
  with open(log_path, "w") as log:
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
  return time.perf_counter() - start


def train_row(row, imbalance):
  run_dir = os.path.join(FLAGS.out_dir, imbalance, row)
  metrics_path = os.path.join(run_dir, "metrics.json")
  wall = None
  if not (FLAGS.reuse and os.path.exists(metrics_path)):
    os.makedirs(run_dir, exist_ok=True)
    wall = _run([sys.executable, "bin/train", f"--flagfile={FLAGS.flagfile_under_test}",
                 f"--run_dir={run_dir}", f"--imbalance={imbalance}", f"--seed={FLAGS.seed}", "--overwrite",
                 *_TRAIN_FLAGS[row], *FLAGS.extra], os.path.join(run_dir, "log.txt"))
  with open(metrics_path) as f:
    metrics = json.load(f)
  wall_path = os.path.join(run_dir, "wall_seconds.txt")
  if wall is not None:
    with open(wall_path, "w") as f:
      f.write(f"{wall:.1f}\n")
  metrics["wall_seconds"] = float(open(wall_path).read()) if os.path.exists(wall_path) else None
  return metrics


def random_init_row(imbalance):
  run_dir = os.path.join(FLAGS.out_dir, imbalance, "sela")
  output = os.path.join(run_dir, "evaluation_random_init.json")
  wall = _run([sys.executable, "bin/evaluate", f"--run_dir={run_dir}", "--random_init", "--verbose=0"],
              os.path.join(run_dir, "log_random_init.txt"))
  with open(output) as f:
    metrics = json.load(f)
  metrics["wall_seconds"] = wall
  return metrics


def pixels_row(imbalance):
  """kNN and logistic regression on raw pixels in [0, 1], K-means (faiss) with K = classes."""
  import faiss  # pylint: disable=g-import-not-at-top
  from sklearn import linear_model, metrics as sk_metrics  # pylint: disable=g-import-not-at-top
  from selabel_tf import train  # pylint: disable=g-import-not-at-top
  from selabel_tf.evaluation import knn  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  config = _config_of(imbalance)
  data = train.build_evaluation_data(config)
  x_train = data.train.images.reshape(data.train.num_examples, -1).astype(np.float32) / 255.0
  x_test = data.test.images.reshape(data.test.num_examples, -1).astype(np.float32) / 255.0
  y_train, y_test = data.train_truth.labels, data.test_truth.labels
  metrics = {}
  result = knn.weighted_knn(x_train, y_train, x_test, num_classes=data.num_classes, ks=config.knn_k)
  for k, accuracy in result.accuracy(y_test).items():
    metrics[f"knn_top1/pixels/k={k}"] = accuracy
  mean, std = x_train.mean(0), x_train.std(0) + 1e-3
  regression = linear_model.LogisticRegression(max_iter=200)
  regression.fit((x_train - mean) / std, y_train)
  metrics["probe_test_top1/pixels"] = float(np.mean(regression.predict((x_test - mean) / std) == y_test))
  metrics["probe_best_layer"] = "pixels"
  kmeans = faiss.Kmeans(x_train.shape[1], data.num_classes, niter=20, seed=FLAGS.seed)
  kmeans.train(x_train)
  _, assigned = kmeans.index.search(x_train, 1)
  metrics["cluster_selabel/head_0/nmi"] = float(sk_metrics.normalized_mutual_info_score(y_train, assigned[:, 0]))
  metrics["cluster_selabel/head_0/ari"] = float(sk_metrics.adjusted_rand_score(y_train, assigned[:, 0]))
  _, assigned = kmeans.index.search(x_test, 1)
  metrics["cluster_test/head_0/nmi"] = float(sk_metrics.normalized_mutual_info_score(y_test, assigned[:, 0]))
  metrics["cluster_test/head_0/ari"] = float(sk_metrics.adjusted_rand_score(y_test, assigned[:, 0]))
  metrics["wall_seconds"] = time.perf_counter() - start
  return metrics


def config_of(flagfile, extra, imbalance, seed):
  """The `TrainConfig` that `bin/train --flagfile=<flagfile> <extra...>` runs for `imbalance` and `seed`:
  parsed by absl from the train program's own flag definitions (`cli.define_flags`), so that nested
  `--flagfile=` lines are followed as bin/train follows them (relative paths from the working directory,
  as there)."""
  from selabel_tf import cli  # pylint: disable=g-import-not-at-top
  from selabel_tf import train  # pylint: disable=g-import-not-at-top
  flag_values = flags.FlagValues()
  cli.define_flags(train.TrainConfig, flag_values)
  flag_values(["train", f"--flagfile={flagfile}", *extra])
  config = cli.config_from_flags(train.TrainConfig, flag_values)
  return dataclasses.replace(config, imbalance=imbalance, seed=seed)


def _config_of(imbalance):
  with contextlib.chdir(ROOT):  # where the runs' bin/train resolves nested flagfiles
    return config_of(FLAGS.flagfile_under_test, FLAGS.extra, imbalance, FLAGS.seed)


def _knn_column(metrics, k):
  values = [v for name, v in metrics.items() if name.startswith("knn_top1/") and name.endswith(f"/k={k}")]
  return 100 * values[0] if values else float("nan")


def format_table(results):
  """One line per (imbalance, row)."""
  ks = (10, 50, 200)
  header = (f"{'train set':<9} {'method':<12} " + " ".join(f"{f'kNN@{k}':>7}" for k in ks) +
            f" {'probe':>6} {'layer':<9} {'NMI':>6} {'ARI':>6} {'NMItest':>7} {'wall s':>7} {'units':>6}")
  lines = [header, "-" * len(header)]
  for imbalance, rows in results.items():
    unit = rows.get("supervised", {}).get("seconds_per_epoch")
    for row, m in rows.items():
      best = m.get("probe_best_layer")
      probe = 100 * m.get(f"probe_test_top1/{best}", float("nan")) if best else float("nan")
      nmi = m.get("cluster_selabel/head_0/nmi", float("nan"))
      ari = m.get("cluster_selabel/head_0/ari", float("nan"))
      nmi_test = m.get("cluster_test/head_0/nmi", float("nan"))
      wall = m.get("wall_seconds") or float("nan")
      units = wall / unit if unit and row != "pixels" else float("nan")
      lines.append(f"{imbalance:<9} {row:<12} " + " ".join(f"{_knn_column(m, k):7.2f}" for k in ks) +
                   f" {probe:6.2f} {str(best or '-'):<9} {nmi:6.3f} {ari:6.3f} {nmi_test:7.3f} {wall:7.0f} "
                   f"{units:6.2f}")
  lines.append("NMI/ARI: the first head's self-labels (pixels: K-means) against the train classes; NMItest: "
               "its argmax on the test split; units: wall time / one epoch of the supervised run")
  return "\n".join(lines)


def main(argv):
  del argv
  unknown = [row for row in FLAGS.rows if row not in ROWS]
  if unknown:
    raise app.UsageError(f"--rows: {unknown} not in {ROWS}")
  results = {}
  for imbalance in FLAGS.imbalance:
    rows = {}
    for row in ROWS:
      if row not in FLAGS.rows:
        continue
      if row in _TRAIN_FLAGS:
        rows[row] = train_row(row, imbalance)
      elif row == "random_init":
        rows[row] = random_init_row(imbalance)
      else:
        rows[row] = pixels_row(imbalance)
      print(format_table({imbalance: {row: rows[row]}}).splitlines()[2], flush=True)
    results[imbalance] = rows
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  with open(os.path.join(FLAGS.out_dir, "quality.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(f"seed {FLAGS.seed}, flagfile {FLAGS.flagfile_under_test}, extra flags {FLAGS.extra or 'none'}")
  print(format_table(results))


if __name__ == "__main__":
  app.run(main)
