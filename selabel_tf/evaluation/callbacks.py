"""Keras callbacks that evaluate a model during or after training (paper sec. 4.1).

* `LinearProbeCallback`: linear probes on every probe layer of the backbone and "features" (`probes`).
* `KNNCallback`: weighted kNN on "features" or any named layer (`knn`).
* `ClusterMetricsCallback`: per head, NMI / adjusted NMI / ARI / matched accuracy of the self-labels
  against the train classes and of the head's argmax on the test split (`cluster_metrics`).

Each takes the labelled data it reads explicitly, as an `EvaluationData` (a train and a test split with
their `GroundTruth`): the training pipeline never sees the ground truth. Each runs every
`every_epochs` epochs (None: never during training) and at the end of training (`at_end`), or now, with
`evaluate()`. Results go to the epoch's Keras logs (so History, TensorBoard and the console after it
see them), to `last_metrics`, to a TensorBoard directory of its own (`log_dir`, chief only) and to the
console log. Passes over the data run on every replica of the model's strategy (`IndexedPass`) and are
gathered on every worker, so under MultiWorkerMirroredStrategy every worker computes the same numbers.

They work with `SelaModel` (its `backbone`, `heads` and `label_state`) and with any model given
`activations=` (a functional model from images to a dict of named activations); the cluster metrics
need per-head logits from `model(images)` and, for the self-labels, a `SelfLabelState`.

Callbacks that evaluate at the same points can share one `ActivationCache`: one pass per split and
training step then serves all of them.
"""

import dataclasses
import logging
import time
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from selabel_tf import inference
from selabel_tf.data import pipeline
from selabel_tf.data import sources
from selabel_tf.evaluation import cluster_metrics as cluster_metrics_lib
from selabel_tf.evaluation import knn as knn_lib
from selabel_tf.evaluation import probes as probes_lib
from selabel_tf.modeling import backbones

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class EvaluationData:
  """The labelled splits an evaluation reads.

  Attributes:
    train: the training split's images (the probes and kNN train on them).
    train_truth: its classes (the probes' targets, the kNN's votes, the self-labels' reference).
    test: the test split's images.
    test_truth: its classes.
    image_size: model input side.
    batch_size: global batch of the evaluation passes.
    seed: seed of the streamed probes' augmentation.
    raw_images: the passes feed the images uint8 as stored, for a model that applies its own
      evaluation transform (an exported SavedModel); else the evaluation transform is applied here.
  """
  train: sources.Dataset
  train_truth: sources.GroundTruth
  test: sources.Dataset
  test_truth: sources.GroundTruth
  image_size: int
  batch_size: int = 1024
  seed: int = 0
  raw_images: bool = False

  @property
  def num_classes(self) -> int:
    return max(self.train_truth.num_classes, self.test_truth.num_classes)

  def split(self, name: str):
    """(Dataset, GroundTruth) of "train" or "test"."""
    if name not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
    return (self.train, self.train_truth) if name == "train" else (self.test, self.test_truth)

  def evaluation_dataset(self, name: str) -> tf.data.Dataset:
    """Every example of the split once, in index order, with the evaluation transform."""
    dataset, _ = self.split(name)
    if self.raw_images:
      return pipeline.stored_images_dataset(dataset, batch_size=self.batch_size)
    config = dataset.augment_config(self.image_size, "none")
    return pipeline.evaluation_dataset(dataset, config, batch_size=self.batch_size)


def _activations_of(model, activations):
  if activations is not None:
    return activations
  backbone = getattr(model, "backbone", None)
  if backbone is None:
    raise ValueError(f"model {model.name!r} has no `backbone`: pass activations=, a functional model "
                     f"from images to a dict of named activations")
  return backbone


class ActivationCache:
  """Pooled activations and per-head predictions of both splits, one pass per split and training step.

  Args:
    data: the splits.
    layers: the activations to keep (pooled as the probes read them; a vector layer as it is).
    heads: also keep each head's argmax prediction (for the cluster metrics).
    activations: a functional model from images to a dict of activations (default: `model.backbone`).
    storage_dtype: dtype of the stored activations ("features" is always float32, for the kNN).
    verbose: 1 shows a progress bar on each pass.
  """

  def __init__(self, data: EvaluationData, layers: Sequence[str], *, heads: bool = True,
               activations: Optional[keras.Model] = None, storage_dtype=tf.float16, verbose: int = 0):
    self.data = data
    self.layers = tuple(dict.fromkeys(layers))
    self.heads = heads
    self.activations = activations
    self.storage_dtype = storage_dtype
    self.verbose = verbose
    self._key, self._results, self._pass = None, {}, None
    self.pass_seconds = 0.0

  def require(self, layers: Sequence[str], heads: bool = False):
    """Adds what another callback needs (before the first pass)."""
    self.layers = tuple(dict.fromkeys(self.layers + tuple(layers)))
    self.heads = self.heads or heads

  def get(self, model: keras.Model, split: str) -> Dict[str, object]:
    """{"activations": {layer: [N, d]}, "heads": [int64 [N] per head] (if `heads`)} of the split, from
    the model as it is now (computed at most once per split and optimizer step)."""
    step = (int(keras.ops.convert_to_numpy(model.optimizer.iterations))
            if getattr(model, "optimizer", None) is not None else -1)
    key = (id(model), step, self.layers, self.heads)
    if key != self._key:
      self._key, self._results = key, {}  # frees the previous step's arrays
    if split not in self._results:
      self._results[split] = self._compute(model, split)
    return self._results[split]

  def _replica_pass(self, model):
    activations = _activations_of(model, self.activations)
    pooling = probes_lib.activation_pooling(activations, self.layers)
    sela_like = self.activations is None and hasattr(model, "heads")

    def replica_fn(batch):
      images = batch["image"]
      outputs = activations(images, training=False)
      # Stored narrow from the device on ("features" stays float32 for the kNN).
      result = {"activations": {layer: value if layer == probes_lib.FEATURES else
                                tf.cast(value, self.storage_dtype)
                                for layer, value in pooling(outputs).items()}}
      if self.heads:
        logits = model.heads(outputs["features"]) if sela_like else model(images, training=False)
        logits = logits if isinstance(logits, (list, tuple)) else [logits]
        result["heads"] = [tf.argmax(head, axis=-1) for head in logits]
      return batch["index"], result

    return inference.IndexedPass(model.distribute_strategy, replica_fn)

  def _compute(self, model, split):
    if self._pass is None or self._pass[0] is not model or self._pass[1] != (self.layers, self.heads):
      self._pass = (model, (self.layers, self.heads), self._replica_pass(model))
    dataset, _ = self.data.split(split)
    start = time.perf_counter()
    outputs = self._pass[2](self.data.evaluation_dataset(split), dataset.num_examples,
                            description=f"evaluation pass over {split}", verbose=self.verbose)
    self.pass_seconds += time.perf_counter() - start
    return outputs


class _EvaluationCallback(keras.callbacks.Callback):
  """Schedules `evaluate()` and reports its metrics; subclasses implement `_evaluate()`."""

  name = "evaluation"

  def __init__(self, data: EvaluationData, *, every_epochs: Optional[int], at_end: bool,
               cache: Optional[ActivationCache], log_dir: Optional[str], verbose: int):
    super().__init__()
    if every_epochs is not None and every_epochs < 1:
      raise ValueError(f"{type(self).__name__}: every_epochs must be None or >= 1, got {every_epochs}")
    self.data = data
    self.every_epochs = every_epochs
    self.at_end = at_end
    self.cache = cache
    self.log_dir = log_dir
    self.verbose = verbose
    self.last_metrics: Dict[str, float] = {}
    self.total_seconds = 0.0  # of every evaluation so far
    self._writer = None
    self._evaluated_at = None
    self._epoch = 0

  def evaluate(self) -> Dict[str, float]:
    """Evaluates the model now; returns (and logs) the metrics."""
    start = time.perf_counter()
    metrics = self._evaluate()
    metrics[f"{self.name}_seconds"] = time.perf_counter() - start
    self.total_seconds += metrics[f"{self.name}_seconds"]
    self.last_metrics = metrics
    self._report(metrics)
    return metrics

  def _evaluate(self) -> Dict[str, float]:
    raise NotImplementedError

  def _step(self):
    optimizer = getattr(self.model, "optimizer", None)
    return int(keras.ops.convert_to_numpy(optimizer.iterations)) if optimizer is not None else 0

  def _report(self, metrics):
    logger.info("%s at step %d: %s", self.name, self._step(),
                ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items()))
    if self.log_dir is None or not self.model.distribute_strategy.extended.should_checkpoint:
      return
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(self.log_dir)
    with self._writer.as_default():
      for key, value in metrics.items():
        if isinstance(value, (int, float)):
          tf.summary.scalar(key, value, step=self._step())
      self._writer.flush()

  def on_epoch_end(self, epoch, logs=None):
    self._epoch = epoch + 1
    if self.every_epochs is not None and (epoch + 1) % self.every_epochs == 0:
      metrics = self.evaluate()
      self._evaluated_at = self._step()
      if logs is not None:
        logs.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

  def on_train_end(self, logs=None):
    if self.at_end and self._evaluated_at != self._step():
      self.evaluate()
      self._evaluated_at = self._step()

  def _cache(self, layers, heads=False):
    if self.cache is None:
      self.cache = ActivationCache(self.data, layers, heads=heads, verbose=self.verbose)
    else:
      self.cache.require(layers, heads)
    return self.cache


class LinearProbeCallback(_EvaluationCallback):
  """Linear probes on frozen activations: train and test top-1 per layer, and the best layer.

  Args:
    data: the labelled splits.
    layers: the probed activations (default: every probe layer of `model.backbone` and "features").
    mode: "cached" (one pass without augmentation, then epochs over the stored activations) or
      "streamed" (the training augmentation, through a frozen copy of the backbone; for data too
      large to store).
    options: `probes.ProbeOptions` (epochs, batch, learning rate).
    every_epochs: evaluate every this many epochs (None: only at the end).
    at_end: evaluate at the end of training.
    activations: a functional model from images to a dict of activations (default `model.backbone`).
    cache: an `ActivationCache` shared with other callbacks (cached mode).
    log_dir: TensorBoard directory (chief only); None: Keras logs and the console.
    verbose: 1 shows progress bars.
  """

  name = "probe"
  MODES = ("cached", "streamed")

  def __init__(self, data: EvaluationData, *, layers: Optional[Sequence[str]] = None,
               mode: str = "cached", options: probes_lib.ProbeOptions = probes_lib.ProbeOptions(),
               every_epochs: Optional[int] = None, at_end: bool = True,
               activations: Optional[keras.Model] = None, cache: Optional[ActivationCache] = None,
               log_dir: Optional[str] = None, verbose: int = 0):
    super().__init__(data, every_epochs=every_epochs, at_end=at_end, cache=cache, log_dir=log_dir,
                     verbose=verbose)
    if mode not in self.MODES:
      raise ValueError(f"LinearProbeCallback: mode must be one of {self.MODES}, got {mode!r}")
    options.validate()
    self.layers = None if layers is None else tuple(layers)
    self.mode = mode
    self.options = options
    self.activations = activations
    self.result: Optional[probes_lib.ProbeResult] = None

  def probed_layers(self):
    """`layers`, or every activation of the backbone, shallowest first, "features" last."""
    if self.layers is not None:
      return self.layers
    if self.activations is None and getattr(self.model, "architecture", None) in backbones.BACKBONES:
      return probes_lib.default_layers(self.model.architecture)  # SelaModel: its backbone's, in order
    names = tuple(_activations_of(self.model, self.activations).output)
    return tuple(n for n in names if n != probes_lib.FEATURES) + tuple(
        n for n in names if n == probes_lib.FEATURES)

  def set_model(self, model):
    super().set_model(model)
    if self.mode == "cached":
      self._cache(self.probed_layers())
      if self.activations is not None and self.cache.activations is None:
        self.cache.activations = self.activations

  def _evaluate(self):
    layers = self.probed_layers()
    strategy = self.model.distribute_strategy
    if self.mode == "cached":
      train, test = self.cache.get(self.model, "train"), self.cache.get(self.model, "test")
      self.result = probes_lib.train_on_cache(
          {layer: train["activations"][layer] for layer in layers}, self.data.train_truth.labels,
          {layer: test["activations"][layer] for layer in layers}, self.data.test_truth.labels,
          num_classes=self.data.num_classes, options=self.options, strategy=strategy,
          verbose=self.verbose)
    else:
      self.result = self._streamed(layers, strategy)
    return {**self.result.metrics(), "probe_best_layer": self.result.best_layer}

  def _streamed(self, layers, strategy):
    train, truth = self.data.train, self.data.train_truth
    batch_size = min(self.options.batch_size, train.num_examples)  # an epoch holds at least one batch
    config = train.augment_config(self.data.image_size, "paper")
    classes = tf.constant(np.asarray(truth.labels, np.int64))
    stream = pipeline.train_dataset(train, config, batch_size=batch_size, seed=self.data.seed)
    stream = stream.map(lambda batch: (batch["image"], tf.gather(classes, batch["index"])))
    test_classes = tf.constant(np.asarray(self.data.test_truth.labels, np.int64))
    test = self.data.evaluation_dataset("test").map(
        lambda batch: (batch["image"], tf.gather(test_classes, batch["index"])))
    return probes_lib.train_streamed(
        _activations_of(self.model, self.activations), layers, stream, train.num_examples // batch_size,
        test, num_classes=self.data.num_classes, options=self.options, strategy=strategy,
        verbose=self.verbose)


class KNNCallback(_EvaluationCallback):
  """Weighted kNN top-1 on the test split against the train split (paper Table 6 protocol).

  Args:
    data: the labelled splits.
    layer: the activation to use ("features", or a probe layer, pooled as the probes read it); None:
      the backbone's embedding (`backbones.embedding_layer`: AlexNet's pool5, ResNet's features), or
      "features" for a model with `activations` of its own.
    ks: numbers of neighbours.
    temperature: the vote weight is exp(similarity / temperature).
    every_epochs, at_end, activations, cache, log_dir, verbose: as `LinearProbeCallback`.
  """

  name = "knn"

  def __init__(self, data: EvaluationData, *, layer: Optional[str] = None,
               ks: Sequence[int] = (10, 50, 200), temperature: float = 0.1,
               every_epochs: Optional[int] = None, at_end: bool = True,
               activations: Optional[keras.Model] = None, cache: Optional[ActivationCache] = None,
               log_dir: Optional[str] = None, verbose: int = 0):
    super().__init__(data, every_epochs=every_epochs, at_end=at_end, cache=cache, log_dir=log_dir,
                     verbose=verbose)
    self.layer = layer
    self.ks = tuple(int(k) for k in ks)
    self.temperature = float(temperature)
    self.activations = activations

  def knn_layer(self) -> str:
    """`layer`, or the model's embedding (see the class docstring)."""
    if self.layer is not None:
      return self.layer
    if self.activations is None and getattr(self.model, "architecture", None) in backbones.BACKBONES:
      return backbones.embedding_layer(self.model.architecture)
    return probes_lib.FEATURES

  def set_model(self, model):
    super().set_model(model)
    self._cache([self.knn_layer()])
    if self.activations is not None and self.cache.activations is None:
      self.cache.activations = self.activations

  def _evaluate(self):
    layer = self.knn_layer()
    train = self.cache.get(self.model, "train")["activations"][layer]
    test = self.cache.get(self.model, "test")["activations"][layer]
    result = knn_lib.weighted_knn(train, self.data.train_truth.labels, test,
                                  num_classes=self.data.num_classes, ks=self.ks,
                                  temperature=self.temperature, strategy=self.model.distribute_strategy)
    accuracy = result.accuracy(self.data.test_truth.labels)
    return {f"knn_top1/{layer}/k={k}": float(accuracy[k]) for k in self.ks}


class ClusterMetricsCallback(_EvaluationCallback):
  """Per head: the self-labels against the train classes, the head's argmax against the test classes.

  Metrics per head t (see `cluster_metrics.cluster_metrics`): cluster_selabel/head_t/<metric> and
  cluster_test/head_t/<metric>, with NMI, adjusted NMI, ARI, Hungarian-matched accuracy, majority-vote
  accuracy (K > classes) and the cluster sizes.

  Args:
    data: the labelled splits.
    state: the `SelfLabelState` holding the self-labels (default: `model.label_state`; None and no
      label state: the test split only).
    every_epochs, at_end, cache, log_dir, verbose: as `LinearProbeCallback`.
  """

  name = "cluster"

  def __init__(self, data: EvaluationData, *, state=None, every_epochs: Optional[int] = None,
               at_end: bool = True, cache: Optional[ActivationCache] = None,
               log_dir: Optional[str] = None, verbose: int = 0):
    super().__init__(data, every_epochs=every_epochs, at_end=at_end, cache=cache, log_dir=log_dir,
                     verbose=verbose)
    self.state = state

  def set_model(self, model):
    super().set_model(model)
    if self.state is None:
      self.state = getattr(model, "label_state", None)
    self._cache([], heads=True)

  def _evaluate(self):
    metrics = {}
    if self.state is not None:
      if self.state.num_examples != self.data.train.num_examples:
        raise ValueError(f"ClusterMetricsCallback: the label state holds {self.state.num_examples} "
                         f"labels, the train split {self.data.train.num_examples} examples")
      for t, (labels, k) in enumerate(zip(self.state.current_labels(), self.state.num_clusters)):
        values = cluster_metrics_lib.cluster_metrics(labels, self.data.train_truth.labels, num_clusters=k)
        metrics.update({f"cluster_selabel/head_{t}/{name}": v for name, v in values.items()})
    predictions = self.cache.get(self.model, "test")["heads"]
    num_clusters = (getattr(self.state, "num_clusters", None) or _output_widths(self.model)
                    or [None] * len(predictions))
    for t, (labels, k) in enumerate(zip(predictions, num_clusters)):
      values = cluster_metrics_lib.cluster_metrics(labels, self.data.test_truth.labels, num_clusters=k)
      metrics.update({f"cluster_test/head_{t}/{name}": v for name, v in values.items()})
    return metrics


def _output_widths(model) -> Optional[List[int]]:
  """K per head of a functional model's outputs [B, K_t] (e.g. an export's heads), else None: without a
  label state, a head's K comes from its output width, so clusters that no test image falls in count."""
  outputs = getattr(model, "outputs", None)
  try:
    widths = [int(output.shape[-1]) for output in outputs]
  except (TypeError, AttributeError, IndexError):
    return None
  return widths or None
