"""tf.data pipelines over an indexed `Dataset`: training, the self-labelling pass, evaluation.

Every element is a dict {"index": int64 [B], "image": float32 [B, S, S, C]}; there are no labels (see
`sources.Dataset`). The decoded uint8 images sit in memory once; a pipeline maps example indices to
images, so shuffling, sharding and augmentation never touch the index. A streamed dataset (too large to
cache, e.g. ImageNet) is read in index order with its index attached, shuffled with a seeded buffer,
and augmented one image at a time (its images differ in size).

* Order. Training visits a stateless random permutation of [0, N) per epoch
  (`tf.random.experimental.index_shuffle` keyed by (seed, epoch)); the label pass visits 0..N-1 in order.
* Sharding. With a `tf.distribute.InputContext` (replicas across workers) each input pipeline takes
  every num_input_pipelines-th position of that order, so shards are disjoint and cover the epoch.
* Augmentation. An example's random parameters depend only on (seed, epoch or pass, index)
  (`augment.sample_params`), so an epoch or a label pass is the same whatever the batching, sharding
  or restart; the pixels are then transformed a whole batch at a time (`augment.apply_batch`).
"""

from typing import Optional

import tensorflow as tf

from selabel_tf.data import augment
from selabel_tf.data.sources import Dataset

# Seeds of the augmentation streams; the training stream and each label pass must not coincide.
_TRAIN_STREAM, _LABEL_PASS_STREAM = 1, 2
SHUFFLE_BUFFER = 16384  # streamed datasets only


def _images_tensor(dataset: Dataset):
  # Kept on the host: tf.data runs there, and the batch goes to the devices after augmentation.
  with tf.device("/cpu:0"):
    return tf.constant(dataset.images)


def _shard(ds, input_context):
  if input_context is None or input_context.num_input_pipelines == 1:
    return ds
  return ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)


def _epoch_key(seed, stream, epoch):
  """The int64 [2] seed of one epoch (or label pass) of one stream; examples fold their index in."""
  return tf.random.experimental.stateless_fold_in(tf.constant([seed, stream], tf.int64), epoch)


def _batch_and_augment(ds, images, config, key, batch_size, drop_remainder):
  height, width = int(images.shape[1]), int(images.shape[2])

  def params(index):
    return index, augment.sample_params(index, key, height, width, config)

  def transform(index, batch_params):
    batch = tf.gather(images, index)
    return {"index": index, "image": augment.apply_batch(batch, batch_params, config)}

  ds = ds.map(params, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _augment_streamed(ds, config, key):
  """(index, uint8 image [H, W, C]) -> (index, float32 [S, S, C]), parameters keyed like in memory."""

  def one(index, image):
    params = augment.sample_params(index, key, tf.shape(image)[0], tf.shape(image)[1], config)
    batched = {name: value[None] for name, value in params.items()}
    return index, augment.apply_batch(image[None], batched, config)[0]

  return ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _as_batches(ds, batch_size, drop_remainder):
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.map(lambda index, image: {"index": index, "image": image})


def _without_autotune(ds):
  """A pipeline with tf.data's autotuning off. With it on, on 2 CPU cores, about half the iterators ran
  their consumer slowly, with a core idle a third of the time for the same CPU work: a bfloat16 label
  pass took 41 s instead of 26 s, and 78 training steps 82 s instead of 53 s. Off, 10 of 10 label
  passes took 25-26 s. The parallel maps then use as many threads as there are cores."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


def _keyed_shuffle(ds, seed):
  """A buffered shuffle whose order depends on the int64 tensor `seed` alone; call it while tracing.

  `Dataset.shuffle` pairs its seed with the global one, and when the global seed is 0 (as after
  `keras.utils.set_random_seed(0)`, which `bin/train --seed=0` calls) it fails on a symbolic seed ("Using
  a symbolic tf.Tensor as a Python bool"). A graph-level seed of our own, set in the traced epoch
  function's graph only, avoids that and keeps the order independent of the global seed.
  """
  tf.random.set_seed(_TRAIN_STREAM)  # the graph being traced, not the program's global seed
  return ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=False)


def train_dataset(dataset: Dataset,
                  config: augment.AugmentConfig,
                  *,
                  batch_size: int,
                  seed: int,
                  initial_epoch: int = 0,
                  input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
  """Endless training batches: epoch after epoch from `initial_epoch`, each a fresh permutation.

  Args:
    dataset: the indexed images.
    config: augmentation (strength "none" gives the evaluation transform).
    batch_size: per input pipeline (use `input_context.get_per_replica_batch_size` under a strategy).
    seed: seed of the permutations and augmentations.
    initial_epoch: the first epoch (a resumed run passes its epoch, and sees the same data).
    input_context: shards the stream across input pipelines.

  Returns:
    A dataset of {"index", "image"} batches; an epoch is N // (batch_size * pipelines) batches.
  """
  num_examples = dataset.num_examples
  images = None if dataset.streamed else _images_tensor(dataset)

  def one_epoch(epoch):
    key = _epoch_key(seed, _TRAIN_STREAM, epoch)
    if dataset.streamed:
      ds = _keyed_shuffle(_shard(dataset.stream(), input_context), key[0])
      return _as_batches(_augment_streamed(ds, config, key), batch_size, drop_remainder=True)
    positions = _shard(tf.data.Dataset.range(num_examples), input_context)
    order = positions.map(lambda i: tf.random.experimental.index_shuffle(i, key, num_examples - 1),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _batch_and_augment(order, images, config, key, batch_size, drop_remainder=True)

  epochs = tf.data.Dataset.range(initial_epoch, 1 << 62)
  return _without_autotune(epochs.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE))


def label_pass_dataset(dataset: Dataset,
                       config: augment.AugmentConfig,
                       *,
                       batch_size: int,
                       seed: int,
                       pass_index: int = 0,
                       input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
  """One deterministic pass over every example, in index order, for collecting log-probabilities.

  The paper labels on augmented data (P = E_t[log softmax], sec. 3.4): pass the training config, and
  a different `pass_index` for each of several averaged passes; strength "none" labels without
  augmentation. The last batch may be short.
  """
  key = _epoch_key(seed, _LABEL_PASS_STREAM, tf.constant(pass_index, tf.int64))
  if dataset.streamed:
    ds = _augment_streamed(_shard(dataset.stream(), input_context), config, key)
    return _without_autotune(_as_batches(ds, batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE))
  positions = _shard(tf.data.Dataset.range(dataset.num_examples), input_context)
  ds = _batch_and_augment(positions, _images_tensor(dataset), config, key, batch_size,
                          drop_remainder=False)
  return _without_autotune(ds.prefetch(tf.data.AUTOTUNE))


def stored_images_dataset(dataset: Dataset, *, batch_size: int) -> tf.data.Dataset:
  """Every example once, in index order, as {"index", "image": uint8 as stored}, for a model that
  transforms its input itself (an exported SavedModel).

  Raises:
    ValueError: a streamed dataset (its images differ in size and cannot be batched as stored).
  """
  if dataset.streamed:
    raise ValueError(f"dataset {dataset.name!r} is streamed (images of varying size): its stored images "
                     f"cannot be batched as they are")
  images = _images_tensor(dataset)
  ds = tf.data.Dataset.range(dataset.num_examples).batch(batch_size).map(
      lambda index: {"index": index, "image": tf.gather(images, index)},
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(dataset: Dataset, config: augment.AugmentConfig, *, batch_size: int,
                       input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
  """Every example once, in index order, with the evaluation transform (resize, centre crop)."""
  if dataset.streamed:
    ds = _shard(dataset.stream(), input_context).map(
        lambda index, image: (index, augment.evaluation_batch(image[None], config)[0]),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _as_batches(ds, batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)
  images = _images_tensor(dataset)
  positions = _shard(tf.data.Dataset.range(dataset.num_examples), input_context)

  def transform(index):
    return {"index": index, "image": augment.evaluation_batch(tf.gather(images, index), config)}

  ds = positions.batch(batch_size).map(transform, num_parallel_calls=tf.data.AUTOTUNE,
                                        deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)
