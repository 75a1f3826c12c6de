"""The main job: SeLa training (paper sec. 3), alternating cross-entropy training and self-labelling.

`run(TrainConfig(...))` is the library entry point; `bin/train` only turns flags into a `TrainConfig`.
It writes a run directory:

  config.json           the effective configuration (a rerun with another config is refused)
  flags.txt             the effective flagfile (written by bin/train)
  backup/               keras BackupAndRestore: weights, optimizer, self-labels, schedule (per epoch)
  labels.npz, .csv      the latest self-labels [T, N] (atomic; see selabel_tf.labels)
  tensorboard/          TensorBoard logs (training, labelling)
  final.weights.h5      the trained model's weights
  (--export_dir)        a SavedModel of it, for TF programs without selabel_tf (see selabel_tf.export)
  metrics.json          final metrics: loss, labelling statistics, NMI/ARI against the ground truth
                        (of the final labels, and of each labelling this process ran: "labellings")
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from typing import Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from selabel_tf import callbacks as callbacks_lib
from selabel_tf import files
from selabel_tf import label_store as label_store_lib
from selabel_tf import labels as labels_lib
from selabel_tf import labeller as labeller_lib
from selabel_tf import precision
from selabel_tf import schedule as schedule_lib
from selabel_tf.data import augment
from selabel_tf.data import pipeline
from selabel_tf.data import sources
from selabel_tf.evaluation import callbacks as eval_callbacks
from selabel_tf.evaluation import cluster_metrics
from selabel_tf.evaluation import probes as probes_lib
from selabel_tf.evaluation import suite
from selabel_tf.modeling import backbones
from selabel_tf.modeling import heads as heads_lib
from selabel_tf.modeling.sela import SelaModel

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
KMEANS_FEATURES = ("features", "embedding")  # --kmeans_features
# kmeans.PREPROCESSINGS (a test keeps them equal), not imported: it would load faiss with every program.
KMEANS_PREPROCESSINGS = ("whitened_pca", "l2")


class ConfigError(ValueError):
  """A configuration value that is not allowed; the message names the flag, the value and the rule."""


def option(default, help_text: str, *, choices: Optional[Sequence[str]] = None, group: str):
  """A `TrainConfig` field with what its flag needs: help, allowed values, the help group."""
  metadata = {"help": help_text, "choices": tuple(choices) if choices else None, "group": group}
  if isinstance(default, tuple):
    return dataclasses.field(default_factory=lambda: default, metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


_DATA, _MODEL, _OPTIMISATION, _LABELLING, _EVALUATION, _RUNTIME = (
    "data", "model", "optimisation", "self-labelling", "evaluation", "runtime")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a SeLa run depends on: one field per `bin/train` flag (help, allowed values and group in
  each field's metadata, from which `selabel_tf.cli` defines the flags)."""
  dataset: str = option("fashion_mnist", "tfds name, IDX directory, image folder or .npz.", group=_DATA)
  run_dir: str = option("runs/fashion_mnist", "Directory the run writes to.", group=_RUNTIME)
  data_dir: Optional[str] = option(None, "tfds data dir.", group=_DATA)
  split: str = option("train", "Split to train on.", group=_DATA)
  download: bool = option(False, "Let tfds download the dataset (needs internet).", group=_DATA)
  image_size: Optional[int] = option(None, "Model input side (default: the dataset's; for an image folder "
                                     "the images' own when they all share one size).", group=_DATA)
  imbalance: str = option("none", "Imbalanced train subset (paper Table 8).",
                          choices=sources.IMBALANCE_MODES, group=_DATA)
  skip_bad_images: bool = option(False, "Image folders: leave out image files that cannot be decoded "
                                 "(one warning lists them) instead of stopping at the first.", group=_DATA)
  train_subset: int = option(0, "Train on a random subset of this many examples of --split (0: all), "
                             "e.g. to screen a recipe quickly.", group=_DATA)
  architecture: str = option("alexnet_small", "Backbone.", choices=backbones.BACKBONES, group=_MODEL)
  heads: str = option("10x2", "Heads: KxT (e.g. 128x10) or K1,K2,... (e.g. 128,256).", group=_MODEL)
  fc_batchnorm: bool = option(True, "AlexNet: BatchNorm between fc6/fc7 and their ReLU, like the conv "
                              "layers' (the official AlexNet has none there; measured in the README's "
                              "Quality section). ResNets have no fc trunk and ignore it.", group=_MODEL)
  fc_dropout: float = option(backbones.ALEXNET_DROPOUT, "AlexNet: rate of the dropout before fc6 and fc7, "
                             "in [0, 1) (the official AlexNet's 0.5; measured in the README's Quality "
                             "section). ResNets have no fc trunk and ignore it.", group=_MODEL)
  supervised: bool = option(False, "Train one head on the dataset's class labels instead of self-labels, "
                            "through the same train step and evaluation (the supervised reference of "
                            "paper Table 8; --heads and the self-labelling flags are not used).",
                            group=_MODEL)
  labels_from: Optional[str] = option(
      None, "Train on the fixed labels of this labels.csv/.npz (e.g. another run's self-labels: label "
      "transfer, paper Table 5) with plain cross-entropy, never relabelling; --heads must match its heads.",
      group=_MODEL)
  lam: float = option(10.0, "Lambda of the Sinkhorn-Knopp labeller (> 0).", group=_LABELLING)
  epochs: int = option(4, "Training epochs.", group=_OPTIMISATION)
  batch_size: int = option(128, "Global batch size (the official CIFAR script's 128: at a fixed number of "
                           "epochs, twice the steps of 256; measured: README).", group=_OPTIMISATION)
  nopts: int = option(4, "Self-labelling steps over the training (#opts), including the start.",
                      group=_LABELLING)
  labelling_spacing: str = option("linear", "Spacing of the labellings (quadratic: denser early).",
                                  choices=schedule_lib.SPACINGS, group=_LABELLING)
  learning_rate: float = option(0.03, "Initial SGD learning rate.", group=_OPTIMISATION)
  momentum: float = option(0.9, "SGD momentum.", group=_OPTIMISATION)
  weight_decay: float = option(5e-4, "Decoupled weight decay of Keras' SGD.", group=_OPTIMISATION)
  lr_drops: Tuple[int, ...] = option((), "Epochs at which the learning rate drops.", group=_OPTIMISATION)
  lr_drop_factor: float = option(0.1, "Factor of each learning-rate drop.", group=_OPTIMISATION)
  augmentation: str = option("paper", "Training augmentation strength.", choices=augment.STRENGTHS,
                             group=_DATA)
  label_augmentation: bool = option(False, "Label on augmented images (the paper) or on clean ones "
                                    "(less noisy labels on short runs, measured: README).",
                                    group=_LABELLING)
  relabel_heads: str = option("all", "Heads re-assigned per labelling: all, or cyclic (one head in turn, "
                              "as the official CIFAR code).", choices=callbacks_lib.RELABEL_HEADS,
                              group=_LABELLING)
  label_passes: int = option(1, "Label passes averaged per labelling.", group=_LABELLING)
  label_batch_size: int = option(0, "Global batch of the label pass (inference only; 0: 4 x --batch_size).",
                                 group=_LABELLING)
  label_pass_precision: str = option(
      "model", "Dtype policy of the label pass: model (the training one), a twin of the model in "
      "float32/mixed_bfloat16/mixed_float16 with the weights copied in before each pass, or auto: the "
      "mixed policy the devices have fast units for (bfloat16 on CPUs with AVX512_BF16 or AMX, TPUs and "
      "GPUs from compute capability 8.0; float16 on 7.x GPUs), else model.",
      choices=precision.LABEL_PASS_PRECISIONS, group=_LABELLING)
  labeller: str = option("sinkhorn", "sinkhorn (the paper) or kmeans (Table 8's baseline: K-means per "
                         "head, DeepCluster-style; on what --kmeans_features and --kmeans_preprocessing "
                         "say).", choices=callbacks_lib.LABELLERS, group=_LABELLING)
  cold_start_labeller: str = option(
      "kmeans", "Labeller of the first labelling(s) (--cold_start_labellings), the first on the untrained "
      "network: kmeans (K-means on its features: the argmax of its flat predictions puts most examples "
      "in one cluster) or same (as --labeller, the paper).",
      choices=("same",) + callbacks_lib.LABELLERS, group=_LABELLING)
  cold_start_labellings: int = option(
      1, "How many labellings, from the first, --cold_start_labeller does (e.g. 2 with kmeans: K-means "
      "at the start and again on the network trained on its labels, then --labeller); <= --nopts. No "
      "effect where the cold start's labeller is --labeller's.",
      group=_LABELLING)
  kmeans_features: str = option(
      "features", "What K-means reads (--labeller=kmeans, the K-means cold start): features (the vector "
      "the heads read; fc7 for AlexNet) or embedding (the backbone's embedding that the kNN reads; pool5 "
      "for AlexNet: 1024-d at 28-32 px, 9216-d at 224 px, where K-means then holds N x 9216 float32).",
      choices=KMEANS_FEATURES, group=_LABELLING)
  kmeans_preprocessing: str = option(
      "whitened_pca", "K-means' preprocessing of its features: whitened_pca (DeepCluster's: PCA to "
      "--kmeans_pca_dim, whitened, then L2 normalisation) or l2 (L2 normalisation alone: K-means in the "
      "kNN's cosine geometry).", choices=KMEANS_PREPROCESSINGS, group=_LABELLING)
  kmeans_pca_dim: int = option(256, "--kmeans_preprocessing=whitened_pca: dimensions of the whitened PCA "
                               "before K-means (DeepCluster: 256); must be below the number of examples.",
                               group=_LABELLING)
  labeller_tol: float = option(labeller_lib.DEFAULT_TOL, "Sinkhorn tolerance (max cluster-size error).",
                               group=_LABELLING)
  labeller_max_iters: int = option(labeller_lib.DEFAULT_MAX_ITERS, "Sinkhorn iteration cap.",
                                   group=_LABELLING)
  labeller_balance: str = option("argmax", "argmax of Q (the paper), exact (sizes floor(N/K) or "
                                 "ceil(N/K)) or sample (labels drawn from Q).",
                                 choices=labeller_lib.BALANCE_MODES, group=_LABELLING)
  labeller_cold_start_balance: str = option(
      "same", "Balance of the first labelling (untrained network): same (as --labeller_balance) or "
      "one of the balance modes.", choices=("same",) + labeller_lib.BALANCE_MODES, group=_LABELLING)
  label_store: str = option(
      "log_probs", "What the label pass keeps: log_probs (every head's [N, K] float32) or features (the "
      "[N, D] features once, each head computed from them when labelled: for many large heads, e.g. "
      "ImageNet's; peak memory in the README).", choices=label_store_lib.STORES, group=_LABELLING)
  label_feature_dtype: str = option("bfloat16", "--label_store=features: dtype of the stored features.",
                                    choices=label_store_lib.FEATURE_DTYPES, group=_LABELLING)
  label_feature_dir: str = option(
      "", "--label_store=features: a local directory where the label pass keeps the features in a file "
      "(removed after each labelling) instead of in memory, so that memory holds one head's kernel, not "
      "the features too (empty: in memory; README \"Scale\").", group=_LABELLING)
  label_matmul_dtype: str = option(
      "float32", "--label_store=features: dtype of the inputs of the heads' product (bfloat16: the kernel "
      "rounded to bfloat16, accumulated in float32; fast where the hardware has bfloat16 units).",
      choices=label_store_lib.MATMUL_DTYPES,
      group=_LABELLING)
  label_sharding: str = option(
      "auto", "Where the labelling holds the label pass: gathered (all N on every worker), sharded (each "
      "replica its own examples; only [K] vectors cross per iteration), auto (sharded with more than one "
      "worker).", choices=callbacks_lib.LABEL_SHARDING, group=_LABELLING)
  labeller_storage: str = option("float32", "Dtype of the stored kernel P^lam (float16: half the memory).",
                                 choices=labeller_lib.STORAGE_DTYPES, group=_LABELLING)
  evaluate: bool = option(True, "Evaluate at the end of training: kNN, linear probes, cluster metrics "
                          "(needs a labelled --eval_split).", group=_EVALUATION)
  eval_every_epochs: int = option(0, "Also evaluate every this many epochs (0: only at the end).",
                                  group=_EVALUATION)
  eval_split: str = option("test", "The labelled split the evaluation tests on.", group=_EVALUATION)
  eval_subset: int = option(0, "Test on a random subset of this many examples of --eval_split (0: all), "
                            "e.g. to screen quickly; the test figures are then the subset's.",
                            group=_EVALUATION)
  eval_batch_size: int = option(0, "Global batch of the evaluation passes (0: the label pass's).",
                                group=_EVALUATION)
  knn_k: Tuple[int, ...] = option((10, 50, 200), "Numbers of neighbours of the weighted kNN.",
                                  group=_EVALUATION)
  knn_layer: str = option("", "The activation the kNN reads: features (the heads' input, the paper's "
                          "fc7 for AlexNet), a probe layer, or empty for the backbone's embedding (AlexNet: "
                          "pool5, the conv trunk's output; ResNet: features).", group=_EVALUATION)
  probe_layers: Tuple[str, ...] = option((), "Probed activations (empty: every probe layer and features).",
                                         group=_EVALUATION)
  probe_mode: str = option("cached", "cached (one pass, epochs over stored activations) or streamed "
                           "(augmented, through a frozen copy: for data too large to store).",
                           choices=eval_callbacks.LinearProbeCallback.MODES, group=_EVALUATION)
  probe_epochs: int = option(10, "Epochs of the linear probes (official: 36).", group=_EVALUATION)
  probe_batch_size: int = option(192, "Global batch of the linear probes (official: 192).",
                                 group=_EVALUATION)
  probe_learning_rate: float = option(0.01, "Initial learning rate of the linear probes (official: 0.01).",
                                      group=_EVALUATION)
  strategy: str = option("auto", "tf.distribute strategy (auto: mirrored over >1 GPU, else default).",
                         choices=STRATEGIES, group=_RUNTIME)
  mixed_precision: bool = option(False, "Train in mixed_bfloat16 (CPU/TPU) or mixed_float16 (GPU).",
                                 group=_RUNTIME)
  seed: int = option(0, "Seed of everything random.", group=_RUNTIME)
  deterministic: bool = option(False, "TF op determinism (bit-identical reruns and resumes).",
                               group=_RUNTIME)
  overwrite: bool = option(False, "Reuse a run_dir written by a different configuration.", group=_RUNTIME)
  export_dir: Optional[str] = option(None, "At the end, also export the trained model as a SavedModel "
                                     "here (as bin/export; see selabel_tf.export).", group=_RUNTIME)

  def validate(self):
    """Checks what can be checked before loading anything; raises ConfigError naming the flag."""
    for field in dataclasses.fields(self):
      choices = field.metadata.get("choices")
      value = getattr(self, field.name)
      if choices and value not in choices:
        raise ConfigError(f"--{field.name}={value!r} must be one of {', '.join(choices)}")
    try:
      heads_lib.parse_heads(self.heads)
    except ValueError as e:
      raise ConfigError(f"--heads: {e}") from None
    checks = [
        (self.lam > 0 and math.isfinite(self.lam), f"--lam={self.lam} must be > 0"),
        (0 <= self.fc_dropout < 1, f"--fc_dropout={self.fc_dropout} must be in [0, 1) (0: no dropout)"),
        (self.epochs >= 1, f"--epochs={self.epochs} must be >= 1"),
        (self.train_subset >= 0, f"--train_subset={self.train_subset} must be >= 0 (0: all examples)"),
        (self.eval_subset >= 0, f"--eval_subset={self.eval_subset} must be >= 0 (0: all examples)"),
        (self.batch_size >= 1, f"--batch_size={self.batch_size} must be >= 1"),
        (self.nopts >= 1, f"--nopts={self.nopts} must be >= 1"),
        (self.learning_rate > 0, f"--learning_rate={self.learning_rate} must be > 0"),
        (self.label_passes >= 1, f"--label_passes={self.label_passes} must be >= 1"),
        (self.label_batch_size >= 0, f"--label_batch_size={self.label_batch_size} must be >= 0 "
         f"(0: 4 x --batch_size)"),
        (self.label_store == "log_probs" or self.label_passes == 1,
         f"--label_store=features keeps one pass's features; --label_passes={self.label_passes} averages "
         f"log-probabilities: pass --label_passes=1"),
        (not self.label_feature_dir or self.label_store == "features",
         f"--label_feature_dir={self.label_feature_dir} keeps the features of --label_store=features in a "
         f"file; --label_store is {self.label_store}"),
        (not self.label_feature_dir or os.path.isdir(self.label_feature_dir),
         f"--label_feature_dir={self.label_feature_dir} is not a directory (a local one, with room for "
         f"the features)"),
        (not self.label_feature_dir or self.label_sharding != "sharded",
         f"--label_feature_dir keeps a gathered label pass in a file; --label_sharding=sharded keeps each "
         f"replica's share on its device"),
        (self.labeller_tol > 0, f"--labeller_tol={self.labeller_tol} must be > 0"),
        (self.kmeans_pca_dim >= 1, f"--kmeans_pca_dim={self.kmeans_pca_dim} must be >= 1"),
        (not (self.supervised and self.labels_from), f"--supervised and --labels_from={self.labels_from}: "
         f"train on the class labels or on the file's, not both"),
        (self.labeller != "kmeans" or self.cold_start_labeller in ("same", "kmeans"),
         f"--cold_start_labeller={self.cold_start_labeller} with --labeller=kmeans: the K-means labeller "
         f"starts with K-means; use same"),
        (self.labeller_max_iters >= 1, f"--labeller_max_iters={self.labeller_max_iters} must be >= 1"),
        (1 <= self.cold_start_labellings <= self.nopts,
         f"--cold_start_labellings={self.cold_start_labellings} must be in [1, --nopts={self.nopts}]"),
        (self.image_size is None or self.image_size >= 8, f"--image_size={self.image_size} must be >= 8"),
        (self.eval_every_epochs >= 0, f"--eval_every_epochs={self.eval_every_epochs} must be >= 0 "
         f"(0: only at the end)"),
        (self.eval_batch_size >= 0, f"--eval_batch_size={self.eval_batch_size} must be >= 0"),
        (len(self.knn_k) >= 1 and all(k >= 1 for k in self.knn_k),
         f"--knn_k={','.join(map(str, self.knn_k))} must be a non-empty list of ints >= 1"),
        (self.probe_epochs >= 1, f"--probe_epochs={self.probe_epochs} must be >= 1"),
        (self.probe_batch_size >= 1, f"--probe_batch_size={self.probe_batch_size} must be >= 1"),
        (self.probe_learning_rate > 0, f"--probe_learning_rate={self.probe_learning_rate} must be > 0"),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(message)
    layers = probes_lib.default_layers(self.architecture)
    knn_layers = (self.knn_layer,) if self.knn_layer else ()  # empty: the backbone's embedding
    for flag, names in (("probe_layers", self.probe_layers), ("knn_layer", knn_layers)):
      unknown = [name for name in names if name not in layers]
      if unknown:
        raise ConfigError(f"--{flag}={','.join(names)}: {', '.join(unknown)} is not a layer of "
                          f"--architecture={self.architecture}; allowed: {', '.join(layers)}")

  def head_sizes(self, num_classes: Optional[int] = None) -> Tuple[int, ...]:
    """K per head: --heads, or with --supervised one head of the dataset's `num_classes`."""
    if self.supervised:
      if num_classes is None:
        raise ConfigError(f"--supervised needs class labels, and --dataset={self.dataset} has none")
      return (int(num_classes),)
    return heads_lib.parse_heads(self.heads)

  def build_model(self, image_shape, num_examples: int, num_classes: Optional[int] = None,
                  name: str = "sela") -> SelaModel:
    """The run's SelaModel, unbuilt, in the current strategy scope (one home for its arguments)."""
    fc_trunk = backbones.has_fc_trunk(self.architecture)
    return SelaModel(self.architecture, image_shape, self.head_sizes(num_classes), num_examples,
                     label_seed=self.seed,
                     fc_batchnorm=self.fc_batchnorm and fc_trunk,
                     fc_dropout=self.fc_dropout if fc_trunk else backbones.ALEXNET_DROPOUT, name=name)

  def label_batch(self) -> int:
    """The label pass's global batch: --label_batch_size, or 4 x --batch_size."""
    return self.label_batch_size or 4 * self.batch_size

  def to_json(self):
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def make_strategy(name: str) -> tf.distribute.Strategy:
  """The tf.distribute strategy for --strategy (auto: mirrored over >1 GPU, else the default)."""
  if name == "auto":
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    gpus = tf.config.list_logical_devices("GPU")
    devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)
  if name == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


# What a run written before one of these flags existed had (its config.json lacks the key): the value
# then, where the default has changed since.
BEFORE_THEIR_FLAG = {"fc_batchnorm": False}


# What a resumed run may change: how it is evaluated, where it exports and where a labelling spills its
# features (a machine's local disk); the training state does not depend on these.
MAY_CHANGE_ON_RESUME = frozenset(
    ["overwrite", "export_dir", "label_feature_dir"] +
    [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] == _EVALUATION])


def prepare_run_dir(config: TrainConfig):
  """Creates run_dir, or checks that an existing one was written by the same configuration (apart from
  MAY_CHANGE_ON_RESUME, whose new values config.json then records)."""
  path = os.path.join(config.run_dir, "config.json")
  if tf.io.gfile.exists(path) and not config.overwrite:
    # A key an older version did not write holds its default, or its value then (BEFORE_THEIR_FLAG).
    previous = {**json.loads(TrainConfig().to_json()), **BEFORE_THEIR_FLAG,
                **json.loads(files.read_text(path))}
    current = json.loads(config.to_json())
    changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    differing = [k for k in changed if k not in MAY_CHANGE_ON_RESUME]
    evaluation = [k for k in changed if k in MAY_CHANGE_ON_RESUME and k != "overwrite"]
    if evaluation:
      logger.info("%s: evaluation/export options changed since the run began: %s", config.run_dir,
                  ", ".join(f"--{k}={previous.get(k)!r} -> {current.get(k)!r}" for k in evaluation))
    if differing:
      raise ConfigError(f"--run_dir={config.run_dir} holds a run with another configuration (differs in "
                        f"{', '.join('--' + k for k in differing)}); pass --overwrite or another --run_dir")
  files.write_text(path, config.to_json())


class _LabelsExport(keras.callbacks.Callback):
  """Writes the current self-labels to run_dir/labels.npz and labels.csv after every epoch, atomically."""

  def __init__(self, state, directory, source_ids):
    super().__init__()
    self.state, self.directory, self.source_ids = state, directory, source_ids

  def on_epoch_end(self, epoch, logs=None):
    labels_lib.write(self.directory, self.state.current_labels(), self.source_ids, epoch + 1)


class ChiefBackupAndRestore(keras.callbacks.BackupAndRestore):
  """Keras' BackupAndRestore with one writer: every worker restores from `backup_dir`, only the chief
  writes (and at the end deletes) it.

  Keras 3's callback writes from every worker to the same files (under MultiWorkerMirroredStrategy
  two workers raced on creating the directory: FileExistsError); the workers' states are equal, so
  the chief's backup is everyone's. With several workers `backup_dir` must be on a filesystem they
  share (a `gs://` bucket, NFS).
  """

  def __init__(self, backup_dir, *, chief: bool, **kwargs):
    super().__init__(backup_dir, **kwargs)
    self.chief = chief

  def on_epoch_end(self, epoch, logs=None):
    if self.chief:
      super().on_epoch_end(epoch, logs)

  def on_train_batch_end(self, batch, logs=None):
    if self.chief:
      super().on_train_batch_end(batch, logs)

  def on_train_end(self, logs=None):
    if self.chief:
      super().on_train_end(logs)


def _resume_epoch(backup_dir):
  path = os.path.join(backup_dir, "training_metadata.json")
  if not tf.io.gfile.exists(path):
    return 0
  return int(json.loads(files.read_text(path))["epoch"])


def _learning_rate(config, steps_per_epoch):
  if not config.lr_drops:
    return config.learning_rate
  boundaries = [int(e) * steps_per_epoch for e in sorted(config.lr_drops)]
  values = [config.learning_rate * config.lr_drop_factor**i for i in range(len(boundaries) + 1)]
  return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


@dataclasses.dataclass(frozen=True)
class RunInputs:
  """The data of a run: the indexed train split (no labels), its pipelines and the evaluation splits."""
  dataset: sources.Dataset
  truth: Optional[sources.GroundTruth]  # for the final metrics only; training never reads it
  image_size: int
  train: tf.data.Dataset
  label_pass: object  # pass_index -> tf.data.Dataset
  steps_per_epoch: int
  initial_epoch: int
  evaluation: Optional[eval_callbacks.EvaluationData]
  # int32 [T, N] labels trained on and never relabelled (--supervised: the classes; --labels_from: the
  # file's), or None: self-labels.
  fixed_labels: Optional[np.ndarray] = None


def run(config: TrainConfig, strategy: Optional[tf.distribute.Strategy] = None,
        flagfile: Optional[str] = None,
        data: Optional[Tuple[sources.Dataset, Optional[sources.GroundTruth]]] = None) -> dict:
  """Trains SeLa as configured, evaluates it; returns (and writes) the final metrics. `data`: the
  (dataset, truth) of --dataset where the caller has loaded it already (bin/label), not read again.

  The process is left as it was found: the global dtype policy is restored (op determinism, once
  enabled, cannot be turned off in TensorFlow).

  Raises:
    ConfigError: a configuration value that is not allowed (the message names the flag).
  """
  config.validate()
  previous_policy = keras.mixed_precision.global_policy()
  try:
    strategy = build_strategy(config, strategy)
    config = resolve_label_pass_precision(config, strategy)
    inputs = build_inputs(config, strategy, data)
    chief = strategy.extended.should_checkpoint
    if chief:
      prepare_run_dir(config)
      if flagfile is not None:
        files.write_text(os.path.join(config.run_dir, "flags.txt"), flagfile)
    model, label_model = build_model(config, inputs, strategy)
    self_label, evaluation, fit_callbacks = build_callbacks(config, inputs, model, label_model, chief)
    history, seconds = fit(config, inputs, model, fit_callbacks)
    metrics = collect_metrics(config, inputs, model, history, seconds, self_label, evaluation)
    if chief:
      write_outputs(config, model, metrics)
      if config.export_dir:
        from selabel_tf import export  # pylint: disable=g-import-not-at-top
        export.export_run_dir(config.run_dir, config.export_dir, data=(inputs.dataset, inputs.truth))
    logger.info("run finished: %s", json.dumps({k: v for k, v in metrics.items() if k != "labellings"}))
    return metrics
  finally:
    keras.mixed_precision.set_global_policy(previous_policy)


def resolve_label_pass_precision(config: TrainConfig, strategy: tf.distribute.Strategy) -> TrainConfig:
  """`config` with --label_pass_precision=auto replaced by the policy it means on the strategy's devices
  (`precision.label_pass_policy`), so that config.json records what ran: a run resumed on hardware where
  auto means another policy is refused (prepare_run_dir), as any other change to its training."""
  return dataclasses.replace(config, label_pass_precision=precision.label_pass_policy(
      config.label_pass_precision, strategy, config.mixed_precision))


def build_strategy(config: TrainConfig, strategy: Optional[tf.distribute.Strategy] = None):
  """Seeds (and op determinism), the strategy (given, or from --strategy), its batch check."""
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.utils.set_random_seed(config.seed)
  strategy = strategy or make_strategy(config.strategy)
  replicas = strategy.num_replicas_in_sync
  if config.batch_size % replicas:
    raise ConfigError(f"--batch_size={config.batch_size} is not divisible by the {replicas} replicas of "
                      f"--strategy={config.strategy}; use a multiple of {replicas}")
  return strategy


def data_error(error: Exception, flag: str, value: str) -> "ConfigError":
  """The data layer's error about `--flag=value` as a ConfigError naming the flags that change the
  outcome (--skip_bad_images, --image_size)."""
  from selabel_tf.data import image_folder  # pylint: disable=g-import-not-at-top
  if isinstance(error, image_folder.BadImageError):
    return ConfigError(f"--{flag}={value}: cannot decode image file {error.path!r}: {error.reason}; fix or "
                       f"remove it, or pass --skip_bad_images to leave undecodable files out")
  if isinstance(error, image_folder.ImageSizeError):
    sizes = ", ".join(f"{w}x{h} ({n} files)" for (w, h), n in sorted(error.sizes.items(), key=lambda i: -i[1])[:5])
    return ConfigError(f"--{flag}={value}: the images have {len(error.sizes)} different sizes ({sizes}"
                       f"{', ...' if len(error.sizes) > 5 else ''}); pass --image_size, the side every image "
                       f"is resized and centre-cropped to")
  return ConfigError(f"--{flag}={value}: {error}")


def load_dataset(config: TrainConfig, split: Optional[str] = None
                 ) -> Tuple[sources.Dataset, Optional[sources.GroundTruth]]:
  """The run's data as configured (--split, or `split`, with its imbalance and subset): (dataset, truth).

  Raises:
    ConfigError: the dataset cannot be loaded, naming the flag that would change that.
  """
  split = split or config.split
  train_split = split == config.split
  try:
    return sources.load(config.dataset, split=split, data_dir=config.data_dir, download=config.download,
                        image_size=config.image_size,
                        imbalance=config.imbalance if train_split else "none",
                        subset=config.train_subset if train_split else None, seed=config.seed,
                        on_bad="skip" if config.skip_bad_images else "error")
  except (FileNotFoundError, ValueError) as e:
    raise data_error(e, "dataset", config.dataset) from None


def fixed_labels(config: TrainConfig, dataset: sources.Dataset,
                 truth: Optional[sources.GroundTruth]) -> Optional[np.ndarray]:
  """The labels a run trains on without relabelling: int32 [T, N] (see `RunInputs.fixed_labels`).

  Raises:
    ConfigError: a --labels_from file that is not the dataset's (its N, its source ids) or not --heads'
      (its head count, a label >= K).
  """
  if config.supervised:
    return None if truth is None else truth.labels[None].astype(np.int32)
  if not config.labels_from:
    return None
  try:
    label_file = labels_lib.read(config.labels_from)
  except (tf.errors.NotFoundError, FileNotFoundError):
    raise ConfigError(f"--labels_from={config.labels_from}: no such file") from None
  except ValueError as e:
    raise ConfigError(f"--labels_from: {e}") from None
  where = f"--labels_from={config.labels_from}"
  if label_file.num_examples != dataset.num_examples:
    raise ConfigError(f"{where} has labels for {label_file.num_examples} examples, --dataset={config.dataset} "
                      f"(--split={config.split}, --imbalance={config.imbalance}, --train_subset="
                      f"{config.train_subset}) has {dataset.num_examples}")
  ids = dataset.source_ids()
  if label_file.source_ids.dtype.kind != ids.dtype.kind or not np.array_equal(label_file.source_ids, ids):
    first = next((i for i in range(len(ids)) if str(label_file.source_ids[i]) != str(ids[i])), 0)
    raise ConfigError(f"{where}: example {first} is {label_file.source_ids[first]!r} in the file and "
                      f"{ids[first]!r} in --dataset={config.dataset}: labels of other examples")
  sizes = heads_lib.parse_heads(config.heads)
  needed = [int(head.max()) + 1 for head in label_file.labels]
  suggestion = ",".join(map(str, needed))
  if label_file.num_heads != len(sizes):
    raise ConfigError(f"{where} has {label_file.num_heads} heads, --heads={config.heads} has {len(sizes)}; "
                      f"pass e.g. --heads={suggestion}")
  for t, (k, need) in enumerate(zip(sizes, needed)):
    if need > k or label_file.labels[t].min() < 0:
      raise ConfigError(f"{where}: head {t} has labels up to {need - 1}, --heads={config.heads} gives it "
                        f"K={k}; pass e.g. --heads={suggestion}")
  return label_file.labels


def build_inputs(config: TrainConfig, strategy: tf.distribute.Strategy,
                 data: Optional[Tuple[sources.Dataset, Optional[sources.GroundTruth]]] = None) -> RunInputs:
  """Loads the dataset (unless given as `data`) and makes the training and label-pass pipelines (and the
  evaluation splits)."""
  dataset, truth = data or load_dataset(config)
  num_clusters = config.head_sizes(None if truth is None else truth.num_classes)
  num_examples = dataset.num_examples
  for t, k in enumerate(num_clusters):
    if k >= num_examples:
      raise ConfigError(f"--heads={config.heads}: head {t} has K={k} clusters, not fewer than the "
                        f"N={num_examples} examples of --dataset={config.dataset}; need K < N")
  if config.batch_size > num_examples:
    raise ConfigError(f"--batch_size={config.batch_size} exceeds the N={num_examples} examples")
  labels = fixed_labels(config, dataset, truth)
  image_size = config.image_size or int(dataset.images.shape[1])
  train_config = dataset.augment_config(image_size, config.augmentation)
  label_config = dataset.augment_config(image_size, config.augmentation if config.label_augmentation
                                        else "none")
  initial_epoch = _resume_epoch(os.path.join(config.run_dir, "backup"))
  train_ds = pipeline.train_dataset(dataset, train_config, batch_size=config.batch_size,
                                    seed=config.seed, initial_epoch=initial_epoch)
  replicas = strategy.num_replicas_in_sync
  label_batch = config.label_batch()
  label_batch += -label_batch % replicas  # every replica gets an equal share of a full batch

  def label_pass(pass_index):
    return pipeline.label_pass_dataset(dataset, label_config, batch_size=label_batch, seed=config.seed,
                                       pass_index=pass_index)

  return RunInputs(dataset, truth, image_size, train_ds, label_pass,
                   num_examples // config.batch_size, initial_epoch,
                   build_evaluation_data(config, image_size) if config.evaluate else None, labels)


def build_evaluation_data(config: TrainConfig, image_size: Optional[int] = None
                          ) -> eval_callbacks.EvaluationData:
  """The labelled train split (as trained on) and --eval_split, for the evaluation suite.

  Raises:
    ConfigError: the dataset cannot be loaded, or a split has no class labels.
  """
  label_batch = config.label_batch()
  try:
    return suite.load_data(config.dataset, image_size=image_size or config.image_size,
                           batch_size=config.eval_batch_size or label_batch, train_split=config.split,
                           test_split=config.eval_split, data_dir=config.data_dir,
                           imbalance=config.imbalance, subset=config.train_subset,
                           test_subset=config.eval_subset, seed=config.seed,
                           on_bad="skip" if config.skip_bad_images else "error")
  except (FileNotFoundError, ValueError) as e:
    error = data_error(e, "dataset", config.dataset)
    raise ConfigError(f"--evaluate: {str(error).split(': ', 1)[1]}; pass --noevaluate, or a labelled "
                      f"--eval_split") from None


def evaluation_options(config: TrainConfig) -> suite.EvaluationOptions:
  """The evaluation suite's options from the config's evaluation flags."""
  return suite.EvaluationOptions(
      knn_ks=tuple(config.knn_k), knn_layer=config.knn_layer or backbones.embedding_layer(config.architecture),
      probe_layers=tuple(config.probe_layers),
      probe_mode=config.probe_mode,
      probe=probes_lib.ProbeOptions(epochs=config.probe_epochs, batch_size=config.probe_batch_size,
                                    learning_rate=config.probe_learning_rate, seed=config.seed))


def build_model(config: TrainConfig, inputs: RunInputs, strategy: tf.distribute.Strategy):
  """The SelaModel, compiled, and the label pass's twin (None: the pass runs on the model itself).

  Sets the global dtype policy for --mixed_precision (`run` restores it)."""
  if config.mixed_precision:
    gpus = tf.config.list_logical_devices("GPU")
    keras.mixed_precision.set_global_policy("mixed_float16" if gpus else "mixed_bfloat16")
  num_classes = None if inputs.truth is None else inputs.truth.num_classes
  num_clusters = config.head_sizes(num_classes)
  with strategy.scope():
    model = config.build_model((inputs.image_size, inputs.image_size, inputs.dataset.channels),
                               inputs.dataset.num_examples, num_classes)
    model.build()
    optimizer = keras.optimizers.SGD(learning_rate=_learning_rate(config, inputs.steps_per_epoch),
                                     momentum=config.momentum, weight_decay=config.weight_decay)
    model.compile_for_self_labelling(optimizer)
    label_model = model.label_pass_twin(precision.label_pass_policy(config.label_pass_precision, strategy,
                                                                    config.mixed_precision))
  if inputs.fixed_labels is not None:  # the class labels or the file's: never relabelled
    model.label_state.assign(inputs.fixed_labels, [np.zeros(k) for k in num_clusters])
  return model, label_model


def build_callbacks(config: TrainConfig, inputs: RunInputs, model: SelaModel, label_model, chief: bool):
  """(the SelfLabelCallback, the evaluation callbacks, every callback of `fit` in order)."""
  tensorboard_dir = os.path.join(config.run_dir, "tensorboard")
  kmeans_layer = (backbones.embedding_layer(config.architecture) if config.kmeans_features == "embedding"
                  else backbones.FEATURES)
  if config.labeller == "kmeans" and config.kmeans_preprocessing == "whitened_pca":
    dims = min(config.kmeans_pca_dim, math.prod(model.backbone.output[kmeans_layer].shape[1:]))
    if inputs.dataset.num_examples <= dims:
      raise ConfigError(f"--kmeans_pca_dim={config.kmeans_pca_dim}: the K-means labeller's PCA to {dims} "
                        f"dimensions needs more than {dims} examples, --dataset={config.dataset} has "
                        f"{inputs.dataset.num_examples}; pass --kmeans_pca_dim={inputs.dataset.num_examples - 1} or less")
  labeller_options = ({"seed": config.seed, "pca_dim": config.kmeans_pca_dim,
                       "preprocessing": config.kmeans_preprocessing}
                      if config.labeller == "kmeans" else
                      {"tol": config.labeller_tol, "max_iters": config.labeller_max_iters,
                       "balance": config.labeller_balance, "storage_dtype": config.labeller_storage,
                       "seed": config.seed})
  # Fixed labels (--supervised, --labels_from) stay; a callback that never labels keeps the run's shape.
  steps = [] if inputs.fixed_labels is not None else schedule_lib.labelling_steps(
      inputs.steps_per_epoch * config.epochs, config.nopts, config.labelling_spacing)
  self_label = callbacks_lib.SelfLabelCallback(
      inputs.label_pass, inputs.dataset.num_examples, config.lam, steps,
      num_passes=config.label_passes, labeller=config.labeller,
      labeller_options=labeller_options, relabel_heads=config.relabel_heads,
      cold_start_labeller=None if config.cold_start_labeller == "same" else config.cold_start_labeller,
      # A K-means cold start on a dataset smaller than the PCA keeps what fits.
      cold_start_options={"seed": config.seed, "preprocessing": config.kmeans_preprocessing,
                          "pca_dim": max(1, min(config.kmeans_pca_dim, inputs.dataset.num_examples - 1))},
      cold_start_labellings=config.cold_start_labellings, kmeans_layer=kmeans_layer,
      cold_start_balance=(None if config.labeller_cold_start_balance == "same"
                          else config.labeller_cold_start_balance),
      label_model=label_model, label_store=config.label_store, feature_dtype=config.label_feature_dtype,
      feature_dir=config.label_feature_dir or None,
      matmul_dtype=config.label_matmul_dtype, label_sharding=config.label_sharding,
      log_dir=os.path.join(tensorboard_dir, "selabel") if chief else None,
      sheet_images=None if inputs.dataset.streamed else inputs.dataset.images,
      # The NMI/ARI of each labelling against the classes, where known (a diagnostic; never trained on).
      class_labels=None if inputs.truth is None else inputs.truth.labels, verbose=0)
  evaluation = []
  if inputs.evaluation is not None:
    evaluation = suite.build_callbacks(inputs.evaluation, evaluation_options(config),
                                       every_epochs=config.eval_every_epochs or None, at_end=True,
                                       log_dir=os.path.join(tensorboard_dir, "evaluation"), verbose=1)
  fit_callbacks = [
      ChiefBackupAndRestore(os.path.join(config.run_dir, "backup"), chief=chief, save_freq="epoch",
                            double_checkpoint=True),
      self_label,
      *([_LabelsExport(model.label_state, config.run_dir, inputs.dataset.source_ids())] if chief else []),
      *evaluation,  # before TensorBoard, which then logs what they add to the epoch's logs
      *([keras.callbacks.TensorBoard(tensorboard_dir, update_freq="epoch")] if chief else []),
  ]
  return self_label, evaluation, fit_callbacks


def fit(config: TrainConfig, inputs: RunInputs, model: SelaModel, fit_callbacks):
  """model.fit over the epochs (resuming from the backup); returns (history, seconds)."""
  start = time.perf_counter()
  history = model.fit(inputs.train, epochs=config.epochs, steps_per_epoch=inputs.steps_per_epoch,
                      callbacks=fit_callbacks, verbose=2)
  return history, time.perf_counter() - start


def collect_metrics(config, inputs: RunInputs, model, history, seconds, self_label, evaluation) -> dict:
  """Training, labelling and evaluation metrics; NMI/ARI of the final self-labels against the classes."""
  labels = model.label_state.current_labels()
  epochs_run = max(1, config.epochs - inputs.initial_epoch)
  evaluation_metrics = suite.collect_metrics(evaluation) if evaluation else {}
  # The last evaluation's cost; training time excludes every evaluation's.
  evaluation_seconds = sum(callback.last_metrics.get(f"{callback.name}_seconds", 0.0)
                           for callback in evaluation)
  all_evaluations = sum(callback.total_seconds for callback in evaluation)
  metrics = {"epochs": config.epochs, "resumed_from_epoch": inputs.initial_epoch,
             "num_examples": inputs.dataset.num_examples, "train_seconds": seconds - all_evaluations,
             "seconds_per_epoch": (seconds - all_evaluations) / epochs_run,
             "final_loss": float(history.history["loss"][-1]) if history.history.get("loss") else None,
             **self_label.last_metrics, **evaluation_metrics}
  if evaluation:
    metrics["evaluation_seconds"] = evaluation_seconds
    logger.info("evaluation: %.1f s (kNN %.1f s, probes %.1f s, clusters %.1f s; of which passes over the "
                "data %.1f s) beside %.1f s per training epoch", evaluation_seconds,
                metrics.get("knn_seconds", 0.0), metrics.get("probe_seconds", 0.0),
                metrics.get("cluster_seconds", 0.0), metrics["evaluation_pass_seconds"],
                metrics["seconds_per_epoch"])
  # Every worker's final state in two numbers: equal on every worker of a run (the logs show it).
  metrics["labels_sha256"] = hashlib.sha256(np.ascontiguousarray(labels, np.int64).tobytes()).hexdigest()
  weights = hashlib.sha256()
  for weight in model.weights:
    weights.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
  metrics["weights_sha256"] = weights.hexdigest()
  if inputs.truth is not None and not config.supervised:  # supervised: the labels are the truth
    agreement = [cluster_metrics.nmi_ari(l, inputs.truth.labels) for l in labels]
    metrics["nmi"] = [a["nmi"] for a in agreement]
    metrics["ari"] = [a["ari"] for a in agreement]
  if len(self_label.steps):  # this process's records: a resumed run's TensorBoard keeps the earlier ones
    metrics["labellings"] = self_label.labelling_records
  return metrics


def write_outputs(config: TrainConfig, model: SelaModel, metrics: dict):
  """final.weights.h5 and metrics.json, each atomically."""
  files.write_atomically(os.path.join(config.run_dir, "final.weights.h5"), model.save_weights)
  files.write_text(os.path.join(config.run_dir, "metrics.json"), json.dumps(metrics, indent=2))
