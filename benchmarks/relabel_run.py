"""What one more labelling of a trained run would give: each labeller on the run's final network, scored
against the train classes.

The run's final weights, its label pass (as the run configured it: clean or augmented images), then for
each head whose K equals the number of classes (or `--heads`) the NMI against the train classes of
- the run's saved self-labels (labels.npz),
- the heads' plain argmax, with no balance constraint (and its smallest and largest cluster),
- Sinkhorn-Knopp at each `--lams` and each `--balances` (the library's `labeller.assign_labels`,
  cold: no warm start), with the fraction of labels equal to the saved ones,
- K-means with K clusters on the L2-normalised embedding (the library's `kmeans.assign_labels_kmeans`,
  `--kmeans_features`, `--kmeans_preprocessing`).
The gap between the argmax and Sinkhorn-Knopp is what the equipartition constraint costs or gains the
labels of this network; the README's "Quality" section quotes it.

  .venv/bin/python benchmarks/relabel_run.py --run_dir=runs/fashion_mnist
"""

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selabel_tf import callbacks as callbacks_lib  # pylint: disable=g-import-not-at-top
from selabel_tf import kmeans
from selabel_tf import labeller
from selabel_tf import labels as labels_lib
from selabel_tf import train
from selabel_tf.data import pipeline
from selabel_tf.evaluation import cluster_metrics
from selabel_tf.evaluation import run_dir as run_dir_lib
from selabel_tf.modeling import backbones

flags.DEFINE_string("run_dir", None, "A bin/train run directory (with labels.npz).", required=True)
flags.DEFINE_list("heads", None, "Heads to score (default: those with as many clusters as classes).")
flags.DEFINE_list("lams", ["1", "10", "100"], "Lambdas of the Sinkhorn-Knopp labellings.")
flags.DEFINE_list("balances", ["argmax", "exact"], f"Balance modes of the Sinkhorn-Knopp labellings "
                  f"(any of {labeller.BALANCE_MODES}).")
flags.DEFINE_enum("kmeans_features", "embedding", train.KMEANS_FEATURES, "What K-means reads.")
flags.DEFINE_enum("kmeans_preprocessing", "l2", train.KMEANS_PREPROCESSINGS, "K-means' preprocessing.")
FLAGS = flags.FLAGS


def nmi(labels, truth):
  return cluster_metrics.nmi_ari(labels, truth)["nmi"]


def main(argv):
  del argv
  start = time.perf_counter()
  restored = run_dir_lib.restore(FLAGS.run_dir)
  config, dataset, truth, model = restored.config, restored.dataset, restored.truth, restored.model
  if truth is None:
    raise app.UsageError(f"--run_dir={FLAGS.run_dir}: its dataset has no classes to score against")
  saved = labels_lib.read(os.path.join(FLAGS.run_dir, "labels.npz")).labels
  num_clusters = model.label_state.num_clusters
  heads = ([int(h) for h in FLAGS.heads] if FLAGS.heads else
           [t for t, k in enumerate(num_clusters) if k == truth.num_classes])
  if not heads or any(not 0 <= t < len(num_clusters) for t in heads):
    raise app.UsageError(f"--heads={FLAGS.heads}: the run's heads are 0..{len(num_clusters) - 1} with K = "
                         f"{list(num_clusters)}; none chosen has K = {truth.num_classes} classes")
  image_size = model.image_shape[0]
  label_config = dataset.augment_config(image_size, config.augmentation if config.label_augmentation
                                        else "none")
  layer = (backbones.embedding_layer(config.architecture) if FLAGS.kmeans_features == "embedding"
           else backbones.FEATURES)
  callback = callbacks_lib.SelfLabelCallback(
      pipeline.label_pass_dataset(dataset, label_config, batch_size=config.label_batch(), seed=config.seed),
      dataset.num_examples, 10.0, steps=[], kmeans_layer=layer, verbose=0)
  callback.set_model(model)
  log_probs = callback.collect_log_probs("sinkhorn")
  features = callback.collect_log_probs("kmeans")
  print(f"run {FLAGS.run_dir}: N = {dataset.num_examples}, {truth.num_classes} classes; heads {heads}; "
        f"label pass and features {time.perf_counter() - start:.0f} s")
  rows = [("saved self-labels", [saved[t] for t in heads])]
  rows.append(("argmax, no balance", [np.argmax(log_probs[t], axis=1) for t in heads]))
  for lam in (float(x) for x in FLAGS.lams):
    for balance in FLAGS.balances:
      result = labeller.assign_labels([log_probs[t] for t in heads], lam, balance=balance, seed=config.seed)
      rows.append((f"Sinkhorn-Knopp lam {lam:g}, {balance}", list(result.labels)))
  result = kmeans.assign_labels_kmeans(features, [num_clusters[t] for t in heads],
                                       preprocessing=FLAGS.kmeans_preprocessing, seed=config.seed)
  rows.append((f"K-means on {layer}, {FLAGS.kmeans_preprocessing}", list(result.labels)))
  print(f"{'labels':<34} " + "  ".join(f"{'head ' + str(t) + ' NMI':>10} {'sizes':>11} {'= saved':>7}"
                                         for t in heads))
  for name, labels in rows:
    cells = []
    for t, head_labels in zip(heads, labels):
      sizes = np.bincount(head_labels, minlength=num_clusters[t])
      cells.append(f"{nmi(head_labels, truth.labels):>10.3f} {sizes.min():>5}..{sizes.max():<5} "
                   f"{np.mean(head_labels == saved[t]):>7.3f}")
    print(f"{name:<34} " + "  ".join(cells), flush=True)
  print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  app.run(main)
