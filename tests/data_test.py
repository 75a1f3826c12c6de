"""Tests of selabel_tf.data.sources and selabel_tf.data.pipeline on real files.

Real data: Debian's Fashion-MNIST IDX files (installed by install.sh), a tfds data dir prepared from them
offline by the real tfds builder, generated image folders and .npz files.
"""

import dataclasses
import hashlib
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from selabel_tf.data import augment
from selabel_tf.data import pipeline
from selabel_tf.data import sources

DEBIAN_DIR = sources.DEBIAN_IDX_DIRS["fashion_mnist"]


@pytest.fixture(scope="session")
def fashion_idx():
  assert os.path.isfile(os.path.join(DEBIAN_DIR, "train-images-idx3-ubyte.gz")), (
      "Debian's dataset-fashion-mnist is missing: run ./install.sh")
  return sources.load(DEBIAN_DIR, split="train")


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  sources.prepare_tfds_from_idx("fashion_mnist", DEBIAN_DIR, data_dir)
  return data_dir


def _fingerprints(images, labels):
  return sorted(hashlib.sha1(image.tobytes()).hexdigest() + str(label)
                for image, label in zip(images, labels))


# --------------------------------------------------------------------------------------------------
# Sources


def test_debian_idx_fashion_mnist(fashion_idx):
  dataset, truth = fashion_idx
  assert dataset.images.shape == (60000, 28, 28, 1) and dataset.images.dtype == np.uint8
  assert np.array_equal(np.bincount(truth.labels), [6000] * 10)
  assert truth.class_names[9] == "Ankle boot"
  assert np.array_equal(dataset.original_index, np.arange(60000))
  test, test_truth = sources.load(DEBIAN_DIR, split="test")
  assert test.num_examples == 10000 and len(test_truth.labels) == 10000


def test_tfds_prepared_offline_matches_the_idx_files(tfds_dir, fashion_idx):
  dataset, truth = sources.load("fashion_mnist", data_dir=tfds_dir)
  assert dataset.origin.startswith(tfds_dir)  # the tfds path, not the Debian fallback
  assert dataset.images.shape == (60000, 28, 28, 1)
  idx_dataset, idx_truth = fashion_idx
  # tfds stores examples in its own (hashed) order: the same (image, label) pairs, indexed differently.
  assert _fingerprints(dataset.images, truth.labels) == _fingerprints(idx_dataset.images,
                                                                      idx_truth.labels)
  # Its index order is stable: a second load gives the same order.
  again, again_truth = sources.load("fashion_mnist", data_dir=tfds_dir)
  assert np.array_equal(again.images[:500], dataset.images[:500])
  assert np.array_equal(again_truth.labels, truth.labels)


def test_default_dataset_falls_back_to_debian_idx(tmp_path):
  dataset, truth = sources.load("fashion_mnist", data_dir=str(tmp_path))
  assert dataset.origin == DEBIAN_DIR and dataset.num_examples == 60000 and truth is not None


def test_default_dataset_error_names_all_three_ways(tmp_path, monkeypatch):
  monkeypatch.setitem(sources.DEBIAN_IDX_DIRS, "fashion_mnist", str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError) as error:
    sources.load("fashion_mnist", data_dir=str(tmp_path))
  message = str(error.value)
  assert "tfds build fashion_mnist" in message
  assert "dataset-fashion-mnist" in message
  assert "download=True" in message


def test_npz_source(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(50, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 4, size=50)
  np.savez(tmp_path / "toy.npz", images=images, labels=labels)
  dataset, truth = sources.load(str(tmp_path / "toy.npz"))
  assert np.array_equal(dataset.images, images) and np.array_equal(truth.labels, labels)
  np.savez(tmp_path / "unlabelled.npz", images=images[..., 0])
  dataset, truth = sources.load(str(tmp_path / "unlabelled.npz"))
  assert dataset.images.shape == (50, 8, 8, 1) and truth is None


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros((2, 4, 4), np.uint8)}, "needs an array 'images'"),
    ({"images": np.zeros((2, 4, 4), np.float32)}, "must be uint8"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, np.int64)}, "'labels' must be"),
])
def test_npz_bad_input(tmp_path, arrays, match):
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=match):
    sources.load(str(tmp_path / "bad.npz"))


def test_missing_and_unknown_sources(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_dataset"):
    sources.load("no_such_dataset")
  (tmp_path / "file.txt").write_text("x")
  with pytest.raises(ValueError, match="not a directory or a .npz"):
    sources.load(str(tmp_path / "file.txt"))


def test_corrupt_idx_file_is_named(tmp_path):
  with open(os.path.join(DEBIAN_DIR, "t10k-labels-idx1-ubyte.gz"), "rb") as f:
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(f.read())
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
  with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
    sources.load(str(tmp_path), split="test")


def _write_folder(root, bad=False):
  rng = np.random.default_rng(1)
  for cls, mode in (("cat", "RGB"), ("dog", "L")):
    os.makedirs(root / cls, exist_ok=True)
    for i in range(6):
      size = (12 + i, 9 + 2 * i)
      Image.fromarray(rng.integers(0, 256, size=size[::-1] + ((3,) if mode == "RGB" else ()),
                                   dtype=np.uint8), mode).save(root / cls / f"{i}.png")
  if bad:
    (root / "dog" / "fake.png").write_text("not an image")


def test_image_folder_through_load(tmp_path):
  _write_folder(tmp_path)
  dataset, truth = sources.load(str(tmp_path), image_size=8)
  assert dataset.images.shape == (12, 8, 8, 3)
  assert np.array_equal(truth.labels, [0] * 6 + [1] * 6) and truth.class_names == ("cat", "dog")
  train, _ = sources.load(str(tmp_path), image_size=8, split="train", holdout_fraction=0.25)
  test, _ = sources.load(str(tmp_path), image_size=8, split="test", holdout_fraction=0.25)
  assert train.num_examples + test.num_examples == 12 and test.num_examples == 3


def test_image_folder_bad_file_error_or_skip(tmp_path):
  _write_folder(tmp_path, bad=True)
  with pytest.raises(ValueError, match="fake.png"):
    sources.load(str(tmp_path), image_size=8)
  dataset, truth = sources.load(str(tmp_path), image_size=8, on_bad="skip")
  assert dataset.num_examples == 12 and len(truth.labels) == 12


# --------------------------------------------------------------------------------------------------
# Imbalanced subsets (paper Table 8)


def test_light_imbalance_counts(fashion_idx):
  dataset, truth = sources.imbalanced_subset(*fashion_idx, "light", seed=3)
  assert np.array_equal(np.bincount(truth.labels), [6000] * 9 + [3000])
  assert dataset.num_examples == 57000
  # Re-indexed 0..N'-1 in original order; original_index maps back to the source.
  assert np.all(np.diff(dataset.original_index) > 0)
  full_dataset, full_truth = fashion_idx
  assert np.array_equal(dataset.images[1234], full_dataset.images[dataset.original_index[1234]])
  assert np.array_equal(truth.labels, full_truth.labels[dataset.original_index])


def test_heavy_imbalance_counts_and_determinism(fashion_idx):
  dataset, truth = sources.imbalanced_subset(*fashion_idx, "heavy", seed=3)
  assert np.array_equal(np.bincount(truth.labels), [5400, 4800, 4200, 3600, 3000, 2400, 1800, 1200,
                                                     600, 600])
  again, _ = sources.imbalanced_subset(*fashion_idx, "heavy", seed=3)
  other, _ = sources.imbalanced_subset(*fashion_idx, "heavy", seed=4)
  assert np.array_equal(again.original_index, dataset.original_index)
  assert not np.array_equal(other.original_index, dataset.original_index)


def test_imbalance_class_flag_and_errors(fashion_idx):
  _, truth = sources.imbalanced_subset(*fashion_idx, "light", imbalance_class=2)
  assert np.bincount(truth.labels)[2] == 3000
  with pytest.raises(ValueError, match="imbalance_class must be in"):
    sources.imbalanced_subset(*fashion_idx, "light", imbalance_class=10)
  with pytest.raises(ValueError, match="imbalance must be one of"):
    sources.load(DEBIAN_DIR, imbalance="medium")


# --------------------------------------------------------------------------------------------------
# Pipelines


@pytest.fixture(scope="module")
def small(fashion_idx):
  dataset, truth = fashion_idx
  keep = np.arange(1000)
  return (dataclasses.replace(dataset, images=dataset.images[keep], original_index=keep),
          dataclasses.replace(truth, labels=truth.labels[keep]))


def _epoch_indices(ds, steps):
  return np.concatenate([batch["index"].numpy() for batch in ds.take(steps)])


def test_training_epochs_are_permutations_keyed_by_seed_and_epoch(small):
  dataset, _ = small
  config = dataset.augment_config(strength="none")
  ds = pipeline.train_dataset(dataset, config, batch_size=100, seed=7)
  two_epochs = _epoch_indices(ds, 20)
  first, second = two_epochs[:1000], two_epochs[1000:]
  assert np.array_equal(np.sort(first), np.arange(1000)) and np.array_equal(np.sort(second), np.arange(1000))
  assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(1000))
  # A restart at epoch 1 sees exactly the second epoch; another seed another order.
  resumed = _epoch_indices(pipeline.train_dataset(dataset, config, batch_size=100, seed=7,
                                                  initial_epoch=1), 10)
  assert np.array_equal(resumed, second)
  other = _epoch_indices(pipeline.train_dataset(dataset, config, batch_size=100, seed=8), 10)
  assert not np.array_equal(other, first)


def test_index_matches_image_under_shuffling_and_two_shards(small):
  dataset, _ = small
  config = dataset.augment_config(strength="none")
  shards = []
  for pipeline_id in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=2)
    ds = pipeline.train_dataset(dataset, config, batch_size=50, seed=7, input_context=context)
    batches = list(ds.take(10))
    indices = np.concatenate([b["index"].numpy() for b in batches])
    images = np.concatenate([b["image"].numpy() for b in batches])
    expected = augment.evaluation_batch(tf.constant(dataset.images[indices]), config).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-6)
    shards.append(indices)
  assert not set(shards[0]) & set(shards[1])
  assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(1000))


def test_label_pass_is_deterministic_and_in_index_order(small):
  dataset, _ = small
  config = dataset.augment_config(strength="paper")
  first = list(pipeline.label_pass_dataset(dataset, config, batch_size=300, seed=1))
  again = list(pipeline.label_pass_dataset(dataset, config, batch_size=64, seed=1))
  indices = np.concatenate([b["index"].numpy() for b in first])
  assert np.array_equal(indices, np.arange(1000))  # every example once, the last batch short
  # The same augmented image for an index, whatever the batching.
  np.testing.assert_allclose(np.concatenate([b["image"].numpy() for b in first]),
                             np.concatenate([b["image"].numpy() for b in again]), atol=1e-5)
  other_pass = next(iter(pipeline.label_pass_dataset(dataset, config, batch_size=300, seed=1,
                                                     pass_index=1)))
  assert not np.allclose(other_pass["image"].numpy(), first[0]["image"].numpy())
  # tf.data's autotuning is off (see pipeline._without_autotune).
  for ds in (pipeline.label_pass_dataset(dataset, config, batch_size=300, seed=1),
             pipeline.train_dataset(dataset, config, batch_size=300, seed=1)):
    assert ds.options().autotune.enabled is False


def test_augmented_batches_shapes_and_ranges(small):
  dataset, _ = small
  config = dataset.augment_config(image_size=24, strength="paper")
  batch = next(iter(pipeline.train_dataset(dataset, config, batch_size=32, seed=0)))
  image = batch["image"].numpy()
  assert image.shape == (32, 24, 24, 1) and image.dtype == np.float32
  mean, std = dataset.normalization()
  assert image.min() >= (0 - mean[0]) / std[0] - 1e-5 and image.max() <= (1 - mean[0]) / std[0] + 1e-5


def test_ground_truth_cannot_reach_training(small):
  dataset, truth = small
  config = dataset.augment_config()
  for ds in (pipeline.train_dataset(dataset, config, batch_size=10, seed=0),
             pipeline.label_pass_dataset(dataset, config, batch_size=10, seed=0),
             pipeline.evaluation_dataset(dataset, config, batch_size=10)):
    assert set(ds.element_spec) == {"index", "image"}
  # Nothing the training side receives carries the labels.
  for field in dataclasses.fields(dataset):
    value = getattr(dataset, field.name)
    if isinstance(value, np.ndarray) and value.shape == truth.labels.shape:
      assert not np.array_equal(value, truth.labels), field.name
  assert not any("label" in field.name for field in dataclasses.fields(dataset))


# --------------------------------------------------------------------------------------------------
# Streamed datasets (too large to cache, e.g. ImageNet): forced here with a zero cache.


@pytest.fixture(scope="module")
def streamed_and_cached(tfds_dir):
  streamed, streamed_truth = sources.load("fashion_mnist", data_dir=tfds_dir, split="test", cache_bytes=0)
  cached, cached_truth = sources.load("fashion_mnist", data_dir=tfds_dir, split="test")
  return streamed, streamed_truth, cached, cached_truth


def test_streamed_dataset_has_the_cached_indices_and_labels(streamed_and_cached):
  streamed, streamed_truth, cached, cached_truth = streamed_and_cached
  assert streamed.streamed and not cached.streamed
  assert streamed.num_examples == cached.num_examples == 10000
  np.testing.assert_array_equal(streamed_truth.labels, cached_truth.labels)
  config = cached.augment_config(strength="none")
  first = next(iter(pipeline.evaluation_dataset(streamed, config, batch_size=500)))
  expected = next(iter(pipeline.evaluation_dataset(cached, config, batch_size=500)))
  np.testing.assert_array_equal(first["index"].numpy(), np.arange(500))
  np.testing.assert_allclose(first["image"].numpy(), expected["image"].numpy(), atol=1e-5)


def test_streamed_label_pass_matches_the_cached_one(streamed_and_cached):
  streamed, _, cached, _ = streamed_and_cached
  config = cached.augment_config(strength="paper")
  got = next(iter(pipeline.label_pass_dataset(streamed, config, batch_size=256, seed=5, pass_index=2)))
  want = next(iter(pipeline.label_pass_dataset(cached, config, batch_size=256, seed=5, pass_index=2)))
  np.testing.assert_array_equal(got["index"].numpy(), want["index"].numpy())
  np.testing.assert_allclose(got["image"].numpy(), want["image"].numpy(), atol=1e-4)


def test_streamed_training_order_ignores_the_global_seed(streamed_and_cached):
  # A global seed of 0 (bin/train --seed=0 calls keras.utils.set_random_seed(0)) once made the keyed
  # shuffle of a streamed epoch fail while tracing; the order must not depend on the global seed.
  streamed, _, cached, _ = streamed_and_cached
  config = cached.augment_config(strength="none")
  orders = []
  for global_seed in (0, 5):
    tf.random.set_seed(global_seed)
    orders.append(_epoch_indices(pipeline.train_dataset(streamed, config, batch_size=1000, seed=3), 10))
  np.testing.assert_array_equal(orders[0], orders[1])
  assert np.array_equal(np.sort(orders[0]), np.arange(10000))
  assert not np.array_equal(orders[0], np.arange(10000))
  # The program's global seed is left alone: the first draw after set_seed(5) is still the same.
  after_pipeline = tf.random.uniform([], seed=1).numpy()
  tf.random.set_seed(5)
  assert tf.random.uniform([], seed=1).numpy() == after_pipeline


def test_streamed_training_epoch_covers_each_shard_once(streamed_and_cached):
  streamed, _, cached, _ = streamed_and_cached
  config = cached.augment_config(strength="paper")
  shards = []
  for pipeline_id in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id)
    ds = pipeline.train_dataset(streamed, config, batch_size=1000, seed=0, input_context=context)
    shards.append(_epoch_indices(ds, 5))
  assert not set(shards[0]) & set(shards[1])
  assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(10000))
  again = _epoch_indices(pipeline.train_dataset(streamed, config, batch_size=1000, seed=0,
                                                input_context=tf.distribute.InputContext(2, 0)), 5)
  np.testing.assert_array_equal(again, shards[0])
