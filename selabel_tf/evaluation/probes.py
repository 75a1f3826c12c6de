"""Linear probes on frozen activations (paper sec. 4.1, Tables 6 and 9; official `eval_linear_probes.py`).

Each probed activation [B, h, w, c] is max-pooled to about `TARGET_DIMENSIONS` values, flattened,
normalised by a BatchNorm without affine parameters and classified by one linear layer; all probes
train at once (the sum of their cross-entropies, each probe its own gradients) with SGD and momentum
and step learning-rate drops. The "features" vector [B, D] is probed as it is.

Pooling. The official code pools the 224 px AlexNet's conv1..conv5 with fixed max-pools (6/6 pad 3,
4/4, 3/3 pad 1, 3/3 pad 1, 2/2) to 9600, 9216, 9600, 9600 and 9216 values. Here every activation gets
an adaptive max-pool (PyTorch's `AdaptiveMaxPool2d` bins: bin i of o covers rows
floor(i h / o) .. ceil((i + 1) h / o) - 1) to o x o, with o the largest side such that o^2 c <= 9600,
and never larger than the map itself. At 224 px that gives the official sizes exactly (10, 6, 5, 5, 6
px per side), and it adapts to any input size and backbone; `probe_dimensions` lists them (the README
has the table for 28, 32, 96 and 224 px).

Two modes (`LinearProbeCallback` picks one):
* cached: one pass without augmentation stores every probe's pooled activations (float16) for the
  train and test splits, then the probes train for epochs over the cache: small data sets.
* streamed: the probes train on the training pipeline's augmented batches through a frozen copy of
  the backbone, which never needs the whole split in memory: ImageNet.
Neither changes the backbone: the cached pass runs it in inference mode, and the streamed probes read
a frozen copy (`keras.models.clone_model`) whose weights are copied in before each run.
"""

import dataclasses
import math
import time
from typing import Dict, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from selabel_tf.modeling import backbones

TARGET_DIMENSIONS = 9600  # the official probes' largest pooled size
FEATURES = backbones.FEATURES
_BN_MOMENTUM, _BN_EPSILON = 0.9, 1e-5  # PyTorch's BatchNorm defaults (momentum 0.1)


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
  """How the probes train (the official `LinearProbesOptimizer`, with the epochs configurable).

  Attributes:
    epochs: training epochs (official: 36).
    batch_size: global batch (official: 192).
    learning_rate: initial SGD learning rate (official: 0.01), multiplied by 0.1 after 10/36, 20/36
      and 30/36 of the epochs (official: epochs 10, 20, 30 of 36).
    momentum: SGD momentum (official: 0.9).
    weight_decay: Keras' decoupled weight decay (official: 1e-5, PyTorch's coupled one).
    seed: seed of the probes' initialisation and of the cached mode's shuffling.
  """
  epochs: int = 36
  batch_size: int = 192
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 1e-5
  seed: int = 0

  def validate(self):
    if self.epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
      raise ValueError(f"ProbeOptions: epochs and batch_size must be >= 1 and learning_rate > 0, got "
                       f"{self}")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """Top-1 accuracies (in [0, 1]) per probed layer.

  Attributes:
    train_top1: layer -> accuracy on the training data during the last epoch (the official report).
    test_top1: layer -> accuracy on the test split.
    best_layer: the layer with the highest test accuracy.
    seconds: wall time of the probe training and evaluation.
  """
  train_top1: Dict[str, float]
  test_top1: Dict[str, float]
  best_layer: str
  seconds: float

  def metrics(self, prefix: str = "probe") -> Dict[str, float]:
    """A flat dict for Keras logs and metrics.json: probe_test_top1/<layer>, ..., probe_best_layer."""
    flat = {f"{prefix}_train_top1/{layer}": value for layer, value in self.train_top1.items()}
    flat.update({f"{prefix}_test_top1/{layer}": value for layer, value in self.test_top1.items()})
    flat[f"{prefix}_best_test_top1"] = self.test_top1[self.best_layer]
    flat[f"{prefix}_seconds"] = self.seconds
    return flat


def default_layers(architecture: str) -> Tuple[str, ...]:
  """Every probe layer of the backbone, shallowest first, then "features"."""
  return backbones.probe_layer_names(architecture) + (FEATURES,)


def pooled_side(side: int, channels: int, target: int = TARGET_DIMENSIONS) -> int:
  """The side o of the o x o adaptive max-pool: largest with o^2 channels <= target, at most `side`."""
  return max(1, min(side, math.isqrt(max(1, target // channels))))


class AdaptiveMaxPool2D(keras.layers.Layer):
  """Max-pool [B, h, w, c] to [B, oh, ow, c] with PyTorch's adaptive bins (overlapping when needed).

  Args:
    output_size: (oh, ow), each at most the input's side.
  """

  def __init__(self, output_size: Sequence[int], **kwargs):
    super().__init__(**kwargs)
    self.output_size = tuple(int(s) for s in output_size)

  @staticmethod
  def _bins(size, out):
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]

  def call(self, x):
    height, width = int(x.shape[1]), int(x.shape[2])
    out_h, out_w = self.output_size
    if (out_h, out_w) == (height, width):
      return x
    rows = [tf.reduce_max(x[:, a:b], axis=1, keepdims=True) for a, b in self._bins(height, out_h)]
    x = tf.concat(rows, axis=1)
    cols = [tf.reduce_max(x[:, :, a:b], axis=2, keepdims=True) for a, b in self._bins(width, out_w)]
    return tf.concat(cols, axis=2)

  def compute_output_shape(self, input_shape):
    return (input_shape[0], *self.output_size, input_shape[3])

  def get_config(self):
    return {**super().get_config(), "output_size": list(self.output_size)}


class ActivationPooling(keras.layers.Layer):
  """{layer: activation} -> {layer: float32 [B, d_layer]}: each [B, h, w, c] activation pooled (see the
  module docstring) and flattened, a vector [B, D] ("features") kept as it is.

  Args:
    shapes: layer -> the activation's shape without the batch, (h, w, c) or (D,).
  """

  def __init__(self, shapes: Dict[str, Sequence[int]], **kwargs):
    super().__init__(**kwargs)
    self.shapes = {layer: tuple(int(d) for d in shape) for layer, shape in shapes.items()}
    self.pools = {}
    for layer, shape in self.shapes.items():
      if len(shape) == 3:
        side = pooled_side(min(shape[:2]), shape[2])
        self.pools[layer] = AdaptiveMaxPool2D((min(side, shape[0]), min(side, shape[1])),
                                              name=f"{layer}_probe_pool")

  def dimensions(self) -> Dict[str, int]:
    """layer -> d_layer, the pooled and flattened size."""
    return {layer: (int(np.prod(self.pools[layer].output_size)) * shape[2] if layer in self.pools
                    else int(np.prod(shape))) for layer, shape in self.shapes.items()}

  def call(self, activations):
    pooled, dimensions = {}, self.dimensions()
    for layer in self.shapes:
      x = activations[layer]
      if layer in self.pools:
        x = self.pools[layer](x)
      # The static width, so that a traced signature (the export's) declares [B, d_layer].
      pooled[layer] = tf.cast(tf.reshape(x, (-1, dimensions[layer])), tf.float32)
    return pooled

  def get_config(self):
    return {**super().get_config(), "shapes": {k: list(v) for k, v in self.shapes.items()}}


def activation_pooling(activations: keras.Model, layers: Sequence[str]) -> ActivationPooling:
  """The pooling of `layers`, outputs of `activations` (a functional model returning a dict, e.g. a
  backbone); raises a ValueError naming a layer it does not have."""
  available = activations.output
  for layer in layers:
    if layer not in available:
      raise ValueError(f"probe layer {layer!r} is not an output of {activations.name!r}; it has "
                       f"{sorted(available)}")
  return ActivationPooling({layer: available[layer].shape[1:] for layer in layers},
                           name=f"{activations.name}_probe_pooling")


def probe_dimensions(architecture: str, image_size: int, channels: int = 3) -> Dict[str, Tuple]:
  """layer -> (activation shape (h, w, c), pooled dimension) at `image_size` px, for documentation."""
  backbone = backbones.build_backbone(architecture, (image_size, image_size, channels))
  dimensions = activation_pooling(backbone, default_layers(architecture)).dimensions()
  return {layer: (tuple(int(d) for d in backbone.output[layer].shape[1:]), dimensions[layer])
          for layer in default_layers(architecture)}


def build_linear_probes(dimensions: Dict[str, int], num_classes: int, seed: int = 0) -> keras.Model:
  """{layer: float [B, d]} -> {layer: logits float32 [B, num_classes]}: BatchNorm (no affine) + linear,
  Xavier-uniform kernels and zero biases as the official probes."""
  inputs = {layer: keras.Input((d,), name=layer) for layer, d in dimensions.items()}
  outputs = {}
  for i, (layer, x) in enumerate(inputs.items()):
    # synchronized: under a MirroredStrategy the statistics cover the global batch, as on one device.
    x = keras.layers.BatchNormalization(center=False, scale=False, momentum=_BN_MOMENTUM,
                                        epsilon=_BN_EPSILON, synchronized=True, dtype="float32",
                                        name=f"{layer}_bn")(x)
    outputs[layer] = keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i),
        dtype="float32", name=f"{layer}_logits")(x)
  return keras.Model(inputs, outputs, name="linear_probes")


def _optimizer(options: ProbeOptions, steps_per_epoch: int):
  boundaries = sorted({max(1, round(options.epochs * e / 36)) * steps_per_epoch for e in (10, 20, 30)})
  values = [options.learning_rate * 0.1**i for i in range(len(boundaries) + 1)]
  schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
  return keras.optimizers.SGD(schedule, momentum=options.momentum, weight_decay=options.weight_decay)


def _compile(probes: keras.Model, options: ProbeOptions, steps_per_epoch: int, layers: Sequence[str]):
  probes.compile(
      optimizer=_optimizer(options, steps_per_epoch),
      loss={layer: keras.losses.SparseCategoricalCrossentropy(from_logits=True) for layer in layers},
      metrics={layer: [keras.metrics.SparseCategoricalAccuracy(name="top1")] for layer in layers})


def _accuracies(logs: Dict[str, float], layers: Sequence[str], single: bool) -> Dict[str, float]:
  # Keras names a dict output's metric "<output>_top1"; with a single output, just "top1".
  return {layer: float(logs["top1" if single else f"{layer}_top1"]) for layer in layers}


def _result(history, test_logs, layers, seconds) -> ProbeResult:
  last = {name: values[-1] for name, values in history.history.items()}
  single = len(layers) == 1
  train, test = _accuracies(last, layers, single), _accuracies(test_logs, layers, single)
  best = max(layers, key=lambda layer: test[layer])
  return ProbeResult(train, test, best, seconds)


def train_on_cache(train_activations: Dict[str, np.ndarray], train_labels: np.ndarray,
                   test_activations: Dict[str, np.ndarray], test_labels: np.ndarray, *,
                   num_classes: int, options: ProbeOptions = ProbeOptions(),
                   strategy: Optional[tf.distribute.Strategy] = None, verbose: int = 0) -> ProbeResult:
  """Trains one probe per cached activation and evaluates it on the test split.

  Args:
    train_activations: layer -> float [N, d_layer] (e.g. float16 from the cached pass).
    train_labels: int [N] true classes.
    test_activations: layer -> float [M, d_layer].
    test_labels: int [M].
    num_classes: C.
    options: the optimisation.
    strategy: where the probes train (default: the current strategy); they are built in its scope.
    verbose: Keras' fit verbosity.
  """
  start = time.perf_counter()
  options.validate()
  layers = tuple(train_activations)
  num_examples = len(train_labels)
  for layer in layers:
    if train_activations[layer].shape[0] != num_examples or test_activations[layer].shape[0] != len(
        test_labels):
      raise ValueError(f"probe layer {layer!r}: {train_activations[layer].shape[0]} train and "
                       f"{test_activations[layer].shape[0]} test activations for {num_examples} and "
                       f"{len(test_labels)} labels")
  strategy = strategy or tf.distribute.get_strategy()
  batch_size = min(options.batch_size, num_examples)
  steps = num_examples // batch_size
  with strategy.scope():
    probes = build_linear_probes({layer: train_activations[layer].shape[1] for layer in layers},
                                 num_classes, options.seed)
    _compile(probes, options, steps, layers)
  rng = np.random.default_rng(options.seed)
  train = _cached_dataset(train_activations, train_labels, layers, batch_size,
                          lambda: rng.permutation(num_examples)[:steps * batch_size])
  test = _cached_dataset(test_activations, test_labels, layers, batch_size,
                         lambda: np.arange(len(test_labels)))
  history = probes.fit(train.repeat(), epochs=options.epochs, steps_per_epoch=steps, shuffle=False,
                       verbose=verbose)
  test_logs = probes.evaluate(test, verbose=0, return_dict=True)
  return _result(history, test_logs, layers, time.perf_counter() - start)


def _cached_dataset(activations, labels, layers, batch_size, order):
  """(inputs {layer: float32 [B, d]}, targets {layer: int [B]}) batches read from host arrays in the
  order `order()` (called once per pass: a new permutation per epoch)."""
  labels = np.asarray(labels, np.int64)

  def batches():
    index = order()
    for begin in range(0, len(index), batch_size):
      rows = np.sort(index[begin:begin + batch_size])  # sorted rows read faster; the batch is a set
      yield ({layer: activations[layer][rows] for layer in layers}, {layer: labels[rows] for layer in layers})

  # Rows leave the generator in their stored dtype (float16) and are widened by TensorFlow, which casts
  # several times faster than numpy.
  signature = ({layer: tf.TensorSpec((None, activations[layer].shape[1]), tf.as_dtype(activations[layer].dtype))
                for layer in layers},
               {layer: tf.TensorSpec((None,), tf.int64) for layer in layers})
  batches_per_pass = -(-len(order()) // batch_size)
  ds = tf.data.Dataset.from_generator(batches, output_signature=signature)
  ds = ds.map(lambda inputs, targets: ({layer: tf.cast(x, tf.float32) for layer, x in inputs.items()},
                                       targets), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.apply(tf.data.experimental.assert_cardinality(batches_per_pass)).prefetch(2)


class _StreamedProbes(keras.Model):
  """images -> frozen activations (always in inference mode: no dropout, BatchNorm's moving statistics;
  no trainable weights) -> pooling -> probes."""

  def __init__(self, frozen, pooling, probes, **kwargs):
    super().__init__(**kwargs)
    self.frozen, self.pooling, self.probes = frozen, pooling, probes
    self.frozen.trainable = False

  def call(self, images, training=False):
    return self.probes(self.pooling(self.frozen(images, training=False)), training=training)


def train_streamed(activations: keras.Model, layers: Sequence[str], train: tf.data.Dataset,
                   steps_per_epoch: int, test: tf.data.Dataset, *, num_classes: int,
                   options: ProbeOptions = ProbeOptions(),
                   strategy: Optional[tf.distribute.Strategy] = None, verbose: int = 0) -> ProbeResult:
  """Trains the probes on streamed (augmented) images through a frozen copy of `activations`.

  Args:
    activations: the backbone (images -> dict of activations); it is copied, never changed.
    layers: the probed outputs.
    train: endless (image float [B, H, W, C], class int [B]) batches of the global batch size.
    steps_per_epoch: batches per epoch.
    test: (image, class) batches covering the test split once.
    num_classes, options, strategy, verbose: as `train_on_cache` (options.batch_size is the
      dataset's own here).
  """
  start = time.perf_counter()
  options.validate()
  layers = tuple(layers)
  strategy = strategy or tf.distribute.get_strategy()
  with strategy.scope():
    copy = keras.models.clone_model(activations)
    copy.set_weights(activations.get_weights())
    pooling = activation_pooling(copy, layers)
    probes = build_linear_probes(pooling.dimensions(), num_classes, options.seed)
    model = _StreamedProbes(copy, pooling, probes, name="streamed_probes")
    _compile(model, options, steps_per_epoch, layers)

  def targets(images, classes):
    return images, {layer: classes for layer in layers}

  history = model.fit(train.map(targets), epochs=options.epochs, steps_per_epoch=steps_per_epoch,
                      shuffle=False, verbose=verbose)
  test_logs = model.evaluate(test.map(targets), verbose=0, return_dict=True)
  return _result(history, test_logs, layers, time.perf_counter() - start)
