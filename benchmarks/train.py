"""Benchmark of the main job: SeLa's epoch time against a plain supervised Keras fit.

In one run, on the default config's data, backbone, batch and pipeline (Fashion-MNIST, small-input
AlexNet, batch 256, paper augmentation), prints:
  * the epoch wall time of SeLa (T heads against self-labels, with self-labelling amortised at the
    default schedule: --nopts labellings over --epochs epochs) and of a supervised fit of the same
    backbone with one head on the ground-truth labels, and their ratio;
  * the train step's images/s, and the input pipeline's images/s alone beside it.

Run:  .venv/bin/python benchmarks/train.py
"""

import time

from absl import app
from absl import flags
import keras
import tensorflow as tf

from selabel_tf import callbacks as callbacks_lib
from selabel_tf.data import pipeline
from selabel_tf.data import sources
from selabel_tf.modeling import backbones
from selabel_tf.modeling import heads as heads_lib
from selabel_tf.modeling.sela import SelaModel


def define_flags():
  flags.DEFINE_string("architecture", "alexnet_small", "Backbone.")
  flags.DEFINE_string("heads", "10,10,64,64", "SeLa heads (as configs/fashion_mnist.cfg).")
  flags.DEFINE_integer("batch_size", 256, "Global batch size.")
  flags.DEFINE_integer("epochs", 3, "Epochs of the default schedule (labelling is amortised over them).")
  flags.DEFINE_integer("nopts", 3, "Labellings over --epochs (as configs/fashion_mnist.cfg).")
  flags.DEFINE_integer("examples", 60000, "Examples used (the first N of Fashion-MNIST's train split).")
  flags.DEFINE_bool("mixed_precision", False, "Train in mixed_bfloat16.")


def timed_epoch(model, ds, steps, callbacks=()):
  """Wall time of one epoch of `steps` steps, after a short warm-up fit (tracing, first batches)."""
  model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)
  start = time.perf_counter()
  model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=list(callbacks))
  return time.perf_counter() - start


def main(argv):
  del argv
  f = flags.FLAGS
  if f.mixed_precision:
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
  dataset, truth = sources.load("fashion_mnist")
  if f.examples < dataset.num_examples:
    dataset = dataset.__class__(**{**dataset.__dict__, "images": dataset.images[:f.examples],
                                   "original_index": dataset.original_index[:f.examples]})
  num_examples, batch = dataset.num_examples, f.batch_size
  steps = num_examples // batch
  config = dataset.augment_config(strength="paper")
  shape = dataset.images.shape[1:]
  train = pipeline.train_dataset(dataset, config, batch_size=batch, seed=0)

  # Supervised: the same backbone and pipeline, one head, ground-truth labels.
  labels = tf.constant(truth.labels[:num_examples])
  supervised_ds = train.map(lambda b: (b["image"], tf.gather(labels, b["index"])))
  images = keras.Input(shape)
  features = backbones.build_backbone(f.architecture, shape)(images)["features"]
  supervised = keras.Model(images, heads_lib.MultiHead((truth.num_classes,))(features)[0])
  supervised.compile(keras.optimizers.SGD(0.03, momentum=0.9),
                     keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  supervised_seconds = timed_epoch(supervised, supervised_ds, steps)

  # SeLa: T heads, self-labels by index; labelling amortised: nopts / epochs labellings per epoch.
  num_clusters = heads_lib.parse_heads(f.heads)
  model = SelaModel(f.architecture, shape, num_clusters, num_examples)
  model.build()
  model.compile_for_self_labelling(keras.optimizers.SGD(0.03, momentum=0.9))
  per_epoch = f.nopts / f.epochs
  label_pass = lambda p: pipeline.label_pass_dataset(dataset, config, batch_size=4 * batch, seed=0, pass_index=p)
  callback = callbacks_lib.SelfLabelCallback(label_pass, num_examples, 10.0, steps=[], verbose=0)
  callback.set_model(model)
  sela_train_seconds = timed_epoch(model, train, steps)
  start = time.perf_counter()
  callback.relabel()
  callback.relabel()  # the second is warm-started, as all but the first in a run
  labelling_seconds = (time.perf_counter() - start) / 2
  sela_seconds = sela_train_seconds + per_epoch * labelling_seconds

  pipe_start = time.perf_counter()
  for _ in train.take(steps):
    pass
  pipeline_rate = steps * batch / (time.perf_counter() - pipe_start)
  step_rate = steps * batch / sela_train_seconds
  print(f"Fashion-MNIST, {num_examples} examples, {f.architecture}, batch {batch}, heads {f.heads}, "
        f"{'mixed_bfloat16' if f.mixed_precision else 'float32'}")
  print(f"supervised fit (1 head, ground truth): {supervised_seconds:.1f} s/epoch")
  print(f"SeLa training steps: {sela_train_seconds:.1f} s/epoch; one self-labelling (label pass + "
        f"Sinkhorn): {labelling_seconds:.1f} s, x{per_epoch:g} per epoch at nopts={f.nopts} over "
        f"{f.epochs} epochs")
  print(f"SeLa epoch with labelling amortised: {sela_seconds:.1f} s = "
        f"{sela_seconds / supervised_seconds:.2f} x the supervised epoch (target <= 1.15)")
  print(f"train step: {step_rate:.0f} images/s; input pipeline alone: {pipeline_rate:.0f} images/s = "
        f"{pipeline_rate / step_rate:.1f} x what the train step consumes (target >= 3)")
  print(f"last labelling: {callback.last_metrics}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
