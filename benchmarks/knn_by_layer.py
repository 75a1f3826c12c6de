"""Weighted kNN (the evaluation's protocol: cosine, k = 10 / 50 / 200, temperature 0.1) on several layers of
a trained run, and of the same network untrained: where along the network the neighbourhoods are kept.

Reads any backbone output (conv1 .. conv5, pool5, features) or any inner Keras layer of the backbone by
name (e.g. fc6_relu, fc7_bn), flattened as it is (no probe pooling), through the library's
`weighted_knn`, on the run's train split against its test split. This is how the embedding layer
(`backbones.embedding_layer`) was chosen; the README's "Quality" section quotes it.

  .venv/bin/python benchmarks/knn_by_layer.py --run_dir=runs/fashion_mnist \\
      --layers=pool5,fc6_relu,features

--cluster_nmi also clusters each layer's train activations into as many clusters as there are classes
and prints the NMI against the train classes: the library's K-means (`selabel_tf.kmeans`: faiss, 20
iterations on every row, seed 0) on the L2-normalised activations (`--kmeans_preprocessing=l2`), and
through DeepCluster's preprocessing (whitened PCA to 256 dimensions, then L2 normalisation; the
default). Set beside the run's self-labels' NMI, it tells how much of the class structure a layer holds
that the heads' labels do not.
"""

import os
import sys
import time

from absl import app
from absl import flags
import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selabel_tf import train  # pylint: disable=g-import-not-at-top
from selabel_tf.evaluation import knn as knn_lib
from selabel_tf.evaluation import run_dir as run_dir_lib

flags.DEFINE_string("run_dir", None, "A bin/train run directory.", required=True)
flags.DEFINE_list("layers", ["pool5", "fc6_relu", "features"], "Backbone outputs or inner layer names.")
flags.DEFINE_list("ks", ["10", "50", "200"], "Numbers of neighbours.")
flags.DEFINE_list("models", ["trained", "untrained"], "trained (the run's final weights) and/or untrained "
                  "(the same network as initialised, --random_init).")
flags.DEFINE_bool("cluster_nmi", False, "Also K-means each layer's train activations (K = classes) and print "
                  "the NMI against the train classes.")
FLAGS = flags.FLAGS


def activations_of(backbone, names):
  """A model from images to the named activations: backbone outputs, else inner layers' outputs."""
  outputs = {name: backbone.output[name] if name in backbone.output else backbone.get_layer(name).output
             for name in names}
  return keras.Model(backbone.inputs, outputs)


def cluster_nmi(values, classes, num_classes):
  """NMI of K-means (K = num_classes) on the L2-normalised rows, and through the K-means labeller's
  preprocessing."""
  from selabel_tf import kmeans  # pylint: disable=g-import-not-at-top
  from selabel_tf.evaluation import cluster_metrics  # pylint: disable=g-import-not-at-top
  return {name: cluster_metrics.cluster_metrics(
              kmeans.assign_labels_kmeans(values, [num_classes], preprocessing=preprocessing,
                                          seed=0).labels[0], classes)["nmi"]
          for name, preprocessing in (("l2", "l2"), ("labeller", "whitened_pca"))}


def layer_knn(restored, data, names, ks):
  model = activations_of(restored.model.backbone, names)
  values = {}
  for split in ("train", "test"):
    dataset, _ = data.split(split)
    values[split] = {name: np.empty((dataset.num_examples, int(np.prod(model.output[name].shape[1:]))),
                                    np.float32) for name in names}  # filled in place: one copy only
    for batch in data.evaluation_dataset(split):
      index = batch["index"].numpy()
      for name, value in model(batch["image"], training=False).items():
        values[split][name][index] = np.asarray(value, np.float32).reshape(len(index), -1)
  results = {}
  for name in names:
    result = knn_lib.weighted_knn(values["train"][name], data.train_truth.labels, values["test"][name],
                                  num_classes=data.num_classes, ks=ks)
    nmi = (cluster_nmi(values["train"][name], data.train_truth.labels, data.num_classes)
           if FLAGS.cluster_nmi else None)
    results[name] = (values["train"][name].shape[1], result.accuracy(data.test_truth.labels), nmi)
  return results


def main(argv):
  del argv
  ks = tuple(int(k) for k in FLAGS.ks)
  print(f"run {FLAGS.run_dir}; weighted kNN top-1 (%), k = {' / '.join(map(str, ks))}")
  for random_init in [{"trained": False, "untrained": True}[m] for m in FLAGS.models]:
    start = time.perf_counter()
    restored = run_dir_lib.restore(FLAGS.run_dir, random_init=random_init)
    data = train.build_evaluation_data(restored.config, restored.model.image_shape[0])
    results = layer_knn(restored, data, FLAGS.layers, ks)
    for name, (dim, accuracy, nmi) in results.items():
      print(f"{'untrained' if random_init else 'trained':<10} {name:<12} {dim:>6}-d  "
            + " / ".join(f"{100 * accuracy[k]:.2f}" for k in ks)
            + (f"   K-means NMI: L2-normalised {nmi['l2']:.3f}, labeller's whitened PCA {nmi['labeller']:.3f}"
               if nmi else ""), flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")
    del restored, data, results
    keras.backend.clear_session()


if __name__ == "__main__":
  app.run(main)
