"""Benchmark of the input pipelines alone: augmented images per second.

Prints images/s of the training pipeline (paper augmentation) and of the self-labelling pass, on the
default dataset (Fashion-MNIST from Debian's IDX files, 28 px, 1 channel) and on a CIFAR-shaped
in-memory dataset (50000 x 32 x 32 x 3), with all cores available to tf.data.

Run:  .venv/bin/python benchmarks/pipeline.py
"""

import dataclasses
import time

from absl import app
from absl import flags
import numpy as np

from selabel_tf.data import pipeline
from selabel_tf.data import sources


def define_flags():
  flags.DEFINE_integer("batch_size", 128, "Batch size.")
  flags.DEFINE_integer("steps", 150, "Batches timed per measurement (after 20 warm-up batches).")
  flags.DEFINE_string("strength", "paper", "Augmentation strength.")


def images_per_second(ds, batch_size, steps):
  iterator = iter(ds)
  for _ in range(20):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(iterator)
  batch["image"].numpy()
  return steps * batch_size / (time.perf_counter() - start)


def measure(dataset, name):
  batch_size, steps = flags.FLAGS.batch_size, flags.FLAGS.steps
  config = dataset.augment_config(strength=flags.FLAGS.strength)
  train = pipeline.train_dataset(dataset, config, batch_size=batch_size, seed=0)
  label_pass = pipeline.label_pass_dataset(dataset, config, batch_size=batch_size, seed=0).repeat()
  print(f"{name} ({dataset.num_examples} x {'x'.join(map(str, dataset.images.shape[1:]))}, "
        f"{flags.FLAGS.strength} augmentation, batch {batch_size}): "
        f"training pipeline {images_per_second(train, batch_size, steps):.0f} images/s, "
        f"label pass {images_per_second(label_pass, batch_size, steps):.0f} images/s", flush=True)


def main(argv):
  del argv
  dataset, _ = sources.load("fashion_mnist")
  measure(dataset, "fashion_mnist")
  rng = np.random.default_rng(0)
  cifar_like = dataclasses.replace(
      dataset, name="cifar10", images=rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
      original_index=np.arange(50000))
  measure(cifar_like, "CIFAR-shaped")


if __name__ == "__main__":
  define_flags()
  app.run(main)
