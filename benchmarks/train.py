"""Benchmark of the main job: SeLa's epoch time against a plain supervised Keras fit.

In one run, on the default config's data, backbone, batch and pipeline (Fashion-MNIST, small-input
AlexNet, batch 128, paper augmentation), prints:
  * the epoch wall time of SeLa (T heads against self-labels, with self-labelling amortised at the
    default schedule: --nopts labellings over --epochs epochs, the label pass in the first of
    --label_pass_precision) and of a supervised fit of the same backbone with one head on the
    ground-truth labels, and their ratio. The machine is shared, so the two fits and a labelling (one
    per label-pass precision) are timed in --rounds interleaved rounds (a third of an epoch each by
    default), and medians are used;
  * the train step's images/s, and the input pipeline's images/s alone beside it.

Run:  .venv/bin/python benchmarks/train.py
"""

import time

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

from selabel_tf import callbacks as callbacks_lib
from selabel_tf import precision
from selabel_tf.data import pipeline
from selabel_tf.data import sources
from selabel_tf.modeling import backbones
from selabel_tf.modeling import heads as heads_lib
from selabel_tf.modeling.sela import SelaModel


def define_flags():
  flags.DEFINE_string("architecture", "alexnet_small", "Backbone.")
  flags.DEFINE_string("heads", "10,10,64,64", "SeLa heads (as configs/fashion_mnist.cfg).")
  flags.DEFINE_bool("fc_batchnorm", True, "AlexNet: BatchNorm in the fc trunk (as bin/train's default).")
  flags.DEFINE_float("fc_dropout", backbones.ALEXNET_DROPOUT, "AlexNet: dropout rate before fc6 and fc7 (as "
                     "bin/train's default).")
  flags.DEFINE_integer("batch_size", 128, "Global batch size (as configs/fashion_mnist.cfg).")
  flags.DEFINE_integer("epochs", 4, "Epochs of the default schedule (labelling is amortised over them; as "
                       "configs/fashion_mnist.cfg).")
  flags.DEFINE_integer("nopts", 3, "Labellings over --epochs (as configs/fashion_mnist.cfg).")
  flags.DEFINE_integer("examples", 60000, "Examples used (the first N of Fashion-MNIST's train split).")
  flags.DEFINE_bool("mixed_precision", False, "Train in mixed_bfloat16.")
  flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds (an epoch's steps split among them).")
  flags.DEFINE_list("label_pass_precision", ["auto"],
                    "Dtype policies of the label pass, each timed in every round (the first as "
                    "configs/fashion_mnist.cfg, and used for the amortised epoch); model: the training "
                    "one; auto: as bin/train's. E.g. mixed_bfloat16,float32 compares them on this machine.")


def timed_fit(model, ds, steps):
  """Wall time of a fit of `steps` steps."""
  start = time.perf_counter()
  model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
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
  block = steps // f.rounds
  config = dataset.augment_config(strength="paper")
  shape = dataset.images.shape[1:]
  train = pipeline.train_dataset(dataset, config, batch_size=batch, seed=0)

  # Supervised: the same backbone and pipeline, one head, ground-truth labels.
  labels = tf.constant(truth.labels[:num_examples])
  supervised_ds = train.map(lambda b: (b["image"], tf.gather(labels, b["index"])))
  images = keras.Input(shape)
  features = backbones.build_backbone(f.architecture, shape, fc_batchnorm=f.fc_batchnorm,
                                      fc_dropout=f.fc_dropout)(images)["features"]
  supervised = keras.Model(images, heads_lib.MultiHead((truth.num_classes,))(features)[0])
  supervised.compile(keras.optimizers.SGD(0.03, momentum=0.9),
                     keras.losses.SparseCategoricalCrossentropy(from_logits=True))

  # SeLa: T heads, self-labels by index; labelling amortised: nopts / epochs labellings per epoch.
  num_clusters = heads_lib.parse_heads(f.heads)
  model = SelaModel(f.architecture, shape, num_clusters, num_examples, fc_batchnorm=f.fc_batchnorm,
                    fc_dropout=f.fc_dropout)
  model.build()
  model.compile_for_self_labelling(keras.optimizers.SGD(0.03, momentum=0.9))
  policies = f.label_pass_precision
  per_epoch = f.nopts / f.epochs
  label_pass = lambda p: pipeline.label_pass_dataset(dataset, config, batch_size=4 * batch, seed=0, pass_index=p)
  callbacks, resolved = [], []
  for policy in policies:
    resolved.append(precision.label_pass_policy(policy, tf.distribute.get_strategy(), f.mixed_precision))
    label_model = model.label_pass_twin(resolved[-1])
    callback = callbacks_lib.SelfLabelCallback(label_pass, num_examples, 10.0, steps=[], verbose=0,
                                               label_model=label_model)
    callback.set_model(model)
    callbacks.append(callback)

  # Warm-up (tracing, first batches), and the first labelling of a run (a cold start).
  timed_fit(supervised, supervised_ds, 3)
  timed_fit(model, train, 3)
  first_seconds = []
  for callback in callbacks:
    start = time.perf_counter()
    callback.relabel()
    first_seconds.append(time.perf_counter() - start)
  # Interleaved rounds (this machine is shared: a slow spell then hits every kind alike), medians.
  supervised_times, sela_times, labelling_times = [], [], [[] for _ in policies]
  for _ in range(f.rounds):
    supervised_times.append(timed_fit(supervised, supervised_ds, block))
    sela_times.append(timed_fit(model, train, block))
    for callback, times in zip(callbacks, labelling_times):
      start = time.perf_counter()
      callback.relabel()  # warm-started, as all but the first in a run
      times.append(time.perf_counter() - start)
  supervised_seconds = float(np.median(supervised_times)) * steps / block
  sela_train_seconds = float(np.median(sela_times)) * steps / block
  labelling_seconds = [float(np.median(times)) for times in labelling_times]
  sela_seconds = sela_train_seconds + per_epoch * labelling_seconds[0]

  pipe_start = time.perf_counter()
  for _ in train.take(steps):
    pass
  pipeline_rate = steps * batch / (time.perf_counter() - pipe_start)
  step_rate = steps * batch / sela_train_seconds
  print(f"Fashion-MNIST, {num_examples} examples, {f.architecture}, batch {batch}, heads {f.heads}, "
        f"{'mixed_bfloat16' if f.mixed_precision else 'float32'}; medians of {f.rounds} interleaved "
        f"rounds of {block} steps of each and one labelling")
  print(f"  supervised s/block {' '.join(f'{t:.1f}' for t in supervised_times)}; SeLa s/block "
        f"{' '.join(f'{t:.1f}' for t in sela_times)}")
  print(f"supervised fit (1 head, ground truth): {supervised_seconds:.1f} s/epoch")
  print(f"SeLa training steps: {sela_train_seconds:.1f} s/epoch")
  names = [p if p == r else f"{p} ({r})" for p, r in zip(policies, resolved)]
  for policy, seconds, first, times in zip(names, labelling_seconds, first_seconds, labelling_times):
    print(f"one self-labelling (label pass in {policy} + Sinkhorn): {seconds:.1f} s (rounds "
          f"{' '.join(f'{t:.1f}' for t in times)}; the first of a run: {first:.1f} s)")
  print(f"labellings per epoch: {per_epoch:g} at nopts={f.nopts} over {f.epochs} epochs, the label pass in "
        f"{names[0]}")
  print(f"SeLa epoch with labelling amortised: {sela_seconds:.1f} s = "
        f"{sela_seconds / supervised_seconds:.2f} x the supervised epoch (target <= 1.15)")
  print(f"train step: {step_rate:.0f} images/s; input pipeline alone: {pipeline_rate:.0f} images/s = "
        f"{pipeline_rate / step_rate:.1f} x what the train step consumes (target >= 3)")
  print(f"last labelling: {callbacks[-1].last_metrics}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
