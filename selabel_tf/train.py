"""The main job: SeLa training (paper sec. 3), alternating cross-entropy training and self-labelling.

`run(TrainConfig(...))` is the library entry point; `bin/train` only turns flags into a `TrainConfig`.
It writes a run directory:

  config.json           the effective configuration (a rerun with another config is refused)
  flags.txt             the effective flagfile (written by bin/train)
  backup/               keras BackupAndRestore: weights, optimizer, self-labels, schedule (per epoch)
  labels.npz            the latest self-labels [T, N] (atomic: temporary file, then rename)
  tensorboard/          TensorBoard logs (training, labelling)
  final.weights.h5      the trained model's weights
  metrics.json          final metrics: loss, labelling statistics, NMI/ARI against the ground truth
"""

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from typing import Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from selabel_tf import callbacks as callbacks_lib
from selabel_tf import labeller
from selabel_tf import schedule as schedule_lib
from selabel_tf.data import augment
from selabel_tf.data import pipeline
from selabel_tf.data import sources
from selabel_tf.modeling import heads as heads_lib
from selabel_tf.modeling.sela import SelaModel

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
ARCHITECTURES = ("alexnet_small", "alexnet", "resnet18", "resnet50")
LABEL_PASS_PRECISIONS = ("model", "float32", "mixed_bfloat16", "mixed_float16")


class ConfigError(ValueError):
  """A configuration value that is not allowed; the message names the flag, the value and the rule."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a SeLa run depends on.

  Attributes:
    dataset: tfds name, IDX directory, image folder or .npz (see `sources.load`).
    run_dir: where the run writes (see the module docstring).
    data_dir: tfds data dir.
    split: the split trained on.
    download: let tfds download the dataset.
    image_size: model input side (default: the dataset's own).
    imbalance: "none", "light" or "heavy" (paper Table 8).
    architecture: one of ARCHITECTURES.
    heads: heads spec, "KxT" or "K1,K2,..." (e.g. "128x10").
    lam: lambda of the labeller.
    epochs: training epochs.
    batch_size: global batch size (split over the replicas).
    nopts: self-labelling steps over the training (paper's #opts), including the start.
    labelling_spacing: "linear" or "quadratic" (denser early, as the official ImageNet runs).
    learning_rate: initial SGD learning rate.
    momentum: SGD momentum.
    weight_decay: decoupled weight decay of Keras' SGD.
    lr_drops: epochs at which the learning rate is multiplied by `lr_drop_factor`.
    lr_drop_factor: the factor of each drop.
    augmentation: "none", "weak" or "paper".
    label_augmentation: label on augmented images (the paper) or not.
    label_passes: label passes averaged per labelling.
    label_batch_size: global batch of the label pass (inference only, so it can be larger than the
      training batch; larger batches run faster); 0: 4 x batch_size.
    label_pass_precision: the dtype policy of the label pass, one of LABEL_PASS_PRECISIONS; "model":
      the training policy. "mixed_bfloat16" runs the pass 1.5x faster on a CPU with AVX512_BF16 (and
      on TPUs and recent GPUs) while training in float32, on a twin of the model
      (`SelaModel.with_dtype_policy`) that gets the weights before each pass.
    labeller_tol: the labeller's tolerance.
    labeller_max_iters: the labeller's iteration cap.
    labeller_balance: "argmax" (the paper: argmax of Q) or "exact" (every cluster gets floor(N/K) or
      ceil(N/K) examples; see `labeller.assign_labels`).
    labeller_cold_start_balance: the labeller's balance for the first labelling of a run, on the
      untrained network (see `SelfLabelCallback`'s cold_start_balance): "same" (the default) as
      `labeller_balance`, or one of `labeller.BALANCE_MODES`.
    labeller_storage: dtype of the stored kernel P^lam, one of `labeller.STORAGE_DTYPES` ("float16":
      half the memory; the ImageNet configs use it).
    strategy: one of STRATEGIES.
    mixed_precision: train in mixed_bfloat16 (CPU/TPU) or mixed_float16 (GPU).
    seed: seed of everything random.
    deterministic: enable TF op determinism (bit-identical reruns and resumes).
    overwrite: reuse a run_dir written by a different configuration.
  """
  dataset: str = "fashion_mnist"
  run_dir: str = "runs/fashion_mnist"
  data_dir: Optional[str] = None
  split: str = "train"
  download: bool = False
  image_size: Optional[int] = None
  imbalance: str = "none"
  architecture: str = "alexnet_small"
  heads: str = "10x2"
  lam: float = 10.0
  epochs: int = 4
  batch_size: int = 256
  nopts: int = 4
  labelling_spacing: str = "linear"
  learning_rate: float = 0.03
  momentum: float = 0.9
  weight_decay: float = 5e-4
  lr_drops: Tuple[int, ...] = ()
  lr_drop_factor: float = 0.1
  augmentation: str = "paper"
  label_augmentation: bool = True
  label_passes: int = 1
  label_batch_size: int = 0
  label_pass_precision: str = "model"
  labeller_tol: float = 0.1
  labeller_max_iters: int = 2000
  labeller_balance: str = "argmax"
  labeller_cold_start_balance: str = "same"
  labeller_storage: str = "float32"
  strategy: str = "auto"
  mixed_precision: bool = False
  seed: int = 0
  deterministic: bool = False
  overwrite: bool = False

  def validate(self):
    """Checks what can be checked before loading anything; raises ConfigError naming the flag."""
    if self.architecture not in ARCHITECTURES:
      raise ConfigError(f"--architecture={self.architecture!r} is unknown; allowed: {', '.join(ARCHITECTURES)}")
    if self.strategy not in STRATEGIES:
      raise ConfigError(f"--strategy={self.strategy!r} is unknown; allowed: {', '.join(STRATEGIES)}")
    try:
      heads_lib.parse_heads(self.heads)
    except ValueError as e:
      raise ConfigError(f"--heads: {e}") from None
    checks = [
        (self.lam > 0 and math.isfinite(self.lam), f"--lam={self.lam} must be > 0"),
        (self.epochs >= 1, f"--epochs={self.epochs} must be >= 1"),
        (self.batch_size >= 1, f"--batch_size={self.batch_size} must be >= 1"),
        (self.nopts >= 1, f"--nopts={self.nopts} must be >= 1"),
        (self.labelling_spacing in schedule_lib.SPACINGS,
         f"--labelling_spacing={self.labelling_spacing!r} must be one of {schedule_lib.SPACINGS}"),
        (self.learning_rate > 0, f"--learning_rate={self.learning_rate} must be > 0"),
        (self.augmentation in augment.STRENGTHS,
         f"--augmentation={self.augmentation!r} must be one of {augment.STRENGTHS}"),
        (self.imbalance in sources.IMBALANCE_MODES,
         f"--imbalance={self.imbalance!r} must be one of {sources.IMBALANCE_MODES}"),
        (self.label_passes >= 1, f"--label_passes={self.label_passes} must be >= 1"),
        (self.label_batch_size >= 0, f"--label_batch_size={self.label_batch_size} must be >= 0 "
         f"(0: 4 x --batch_size)"),
        (self.labeller_tol > 0, f"--labeller_tol={self.labeller_tol} must be > 0"),
        (self.labeller_max_iters >= 1, f"--labeller_max_iters={self.labeller_max_iters} must be >= 1"),
        (self.labeller_storage in labeller.STORAGE_DTYPES,
         f"--labeller_storage={self.labeller_storage!r} must be one of {labeller.STORAGE_DTYPES}"),
        (self.labeller_balance in labeller.BALANCE_MODES,
         f"--labeller_balance={self.labeller_balance!r} must be one of {labeller.BALANCE_MODES}"),
        (self.labeller_cold_start_balance in ("same",) + labeller.BALANCE_MODES,
         f"--labeller_cold_start_balance={self.labeller_cold_start_balance!r} must be one of "
         f"{('same',) + labeller.BALANCE_MODES}"),
        (self.label_pass_precision in LABEL_PASS_PRECISIONS,
         f"--label_pass_precision={self.label_pass_precision!r} must be one of {LABEL_PASS_PRECISIONS}"),
        (self.image_size is None or self.image_size >= 8, f"--image_size={self.image_size} must be >= 8"),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(message)

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


def write_atomically(path: str, write):
  """Calls write(temporary_path), then renames it over `path`: a reader never sees a partial file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  name = os.path.basename(path)
  suffix = name[name.index("."):] if "." in name else ".tmp"  # keeps ".weights.h5", which Keras requires
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def prepare_run_dir(config: TrainConfig):
  """Creates run_dir, or checks that an existing one was written by the same configuration."""
  path = os.path.join(config.run_dir, "config.json")
  if os.path.exists(path) and not config.overwrite:
    with open(path) as f:
      previous = json.load(f)
    current = json.loads(config.to_json())
    differing = sorted(k for k in set(previous) | set(current)
                       if k != "overwrite" and previous.get(k) != current.get(k))
    if differing:
      raise ConfigError(f"--run_dir={config.run_dir} holds a run with another configuration (differs in "
                        f"{', '.join('--' + k for k in differing)}); pass --overwrite or another --run_dir")
  write_atomically(path, lambda tmp: open(tmp, "w").write(config.to_json()))


class _LabelsExport(keras.callbacks.Callback):
  """Writes the current self-labels to run_dir/labels.npz after every epoch, atomically."""

  def __init__(self, state, path):
    super().__init__()
    self.state, self.path = state, path

  def on_epoch_end(self, epoch, logs=None):
    labels = self.state.current_labels()
    write_atomically(self.path, lambda tmp: np.savez(tmp, labels=labels, epoch=epoch + 1))


def _resume_epoch(backup_dir):
  path = os.path.join(backup_dir, "training_metadata.json")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return int(json.load(f)["epoch"])


def _learning_rate(config, steps_per_epoch):
  if not config.lr_drops:
    return config.learning_rate
  boundaries = [int(e) * steps_per_epoch for e in sorted(config.lr_drops)]
  values = [config.learning_rate * config.lr_drop_factor**i for i in range(len(boundaries) + 1)]
  return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def run(config: TrainConfig, strategy: Optional[tf.distribute.Strategy] = None,
        flagfile: Optional[str] = None) -> dict:
  """Trains SeLa as configured; returns (and writes) the final metrics.

  Raises:
    ConfigError: a configuration value that is not allowed (the message names the flag).
  """
  config.validate()
  num_clusters = heads_lib.parse_heads(config.heads)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.utils.set_random_seed(config.seed)
  strategy = strategy or make_strategy(config.strategy)
  replicas = strategy.num_replicas_in_sync
  if config.batch_size % replicas:
    raise ConfigError(f"--batch_size={config.batch_size} is not divisible by the {replicas} replicas of "
                      f"--strategy={config.strategy}; use a multiple of {replicas}")

  try:
    dataset, truth = sources.load(config.dataset, split=config.split, data_dir=config.data_dir,
                                  download=config.download, image_size=config.image_size,
                                  imbalance=config.imbalance, seed=config.seed)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"--dataset={config.dataset}: {e}") from None
  num_examples = dataset.num_examples
  for t, k in enumerate(num_clusters):
    if k >= num_examples:
      raise ConfigError(f"--heads={config.heads}: head {t} has K={k} clusters, not fewer than the "
                        f"N={num_examples} examples of --dataset={config.dataset}; need K < N")
  if config.batch_size > num_examples:
    raise ConfigError(f"--batch_size={config.batch_size} exceeds the N={num_examples} examples")
  # Under MultiWorkerMirroredStrategy every worker trains; only the chief writes the run directory
  # (BackupAndRestore keeps the other workers' backups apart itself).
  chief = strategy.extended.should_checkpoint
  if chief:
    prepare_run_dir(config)
  if flagfile is not None and chief:
    write_atomically(os.path.join(config.run_dir, "flags.txt"), lambda tmp: open(tmp, "w").write(flagfile))

  image_size = config.image_size or int(dataset.images.shape[1])
  train_config = dataset.augment_config(image_size, config.augmentation)
  label_config = dataset.augment_config(image_size, config.augmentation if config.label_augmentation
                                        else "none")
  steps_per_epoch = num_examples // config.batch_size
  total_steps = steps_per_epoch * config.epochs
  backup_dir = os.path.join(config.run_dir, "backup")
  initial_epoch = _resume_epoch(backup_dir)

  if config.mixed_precision:
    gpus = tf.config.list_logical_devices("GPU")
    keras.mixed_precision.set_global_policy("mixed_float16" if gpus else "mixed_bfloat16")
  with strategy.scope():
    model = SelaModel(config.architecture, (image_size, image_size, dataset.channels), num_clusters,
                      num_examples, name="sela")
    model.build()
    optimizer = keras.optimizers.SGD(learning_rate=_learning_rate(config, steps_per_epoch),
                                     momentum=config.momentum, weight_decay=config.weight_decay)
    model.compile_for_self_labelling(optimizer)
    label_model = model.label_pass_twin(config.label_pass_precision)

  train_ds = pipeline.train_dataset(dataset, train_config, batch_size=config.batch_size,
                                    seed=config.seed, initial_epoch=initial_epoch)
  label_batch = config.label_batch_size or 4 * config.batch_size
  label_batch += -label_batch % replicas  # every replica gets an equal share of a full batch

  def label_pass(pass_index):
    return pipeline.label_pass_dataset(dataset, label_config, batch_size=label_batch, seed=config.seed,
                                       pass_index=pass_index)

  tensorboard_dir = os.path.join(config.run_dir, "tensorboard")
  self_label = callbacks_lib.SelfLabelCallback.with_schedule(
      label_pass, num_examples, config.lam, total_steps=total_steps, num_labellings=config.nopts,
      spacing=config.labelling_spacing, num_passes=config.label_passes,
      labeller_options={"tol": config.labeller_tol, "max_iters": config.labeller_max_iters,
                        "balance": config.labeller_balance, "storage_dtype": config.labeller_storage,
                        "seed": config.seed},
      cold_start_balance=(None if config.labeller_cold_start_balance == "same"
                          else config.labeller_cold_start_balance),
      label_model=label_model,
      log_dir=os.path.join(tensorboard_dir, "selabel"), verbose=0)
  fit_callbacks = [
      keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch", double_checkpoint=True),
      self_label,
      *([_LabelsExport(model.label_state, os.path.join(config.run_dir, "labels.npz"))] if chief else []),
      keras.callbacks.TensorBoard(tensorboard_dir, update_freq="epoch"),
  ]
  start = time.perf_counter()
  history = model.fit(train_ds, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                      callbacks=fit_callbacks, verbose=2)
  seconds = time.perf_counter() - start

  if chief:
    write_atomically(os.path.join(config.run_dir, "final.weights.h5"), model.save_weights)
  labels = model.label_state.current_labels()
  metrics = {"epochs": config.epochs, "resumed_from_epoch": initial_epoch, "num_examples": num_examples,
             "train_seconds": seconds,
             "final_loss": float(history.history["loss"][-1]) if history.history.get("loss") else None,
             **self_label.last_metrics}
  if truth is not None:
    from sklearn import metrics as sk_metrics  # pylint: disable=g-import-not-at-top
    metrics["nmi"] = [float(sk_metrics.normalized_mutual_info_score(truth.labels, l)) for l in labels]
    metrics["ari"] = [float(sk_metrics.adjusted_rand_score(truth.labels, l)) for l in labels]
  if chief:
    write_atomically(os.path.join(config.run_dir, "metrics.json"),
                     lambda tmp: open(tmp, "w").write(json.dumps(metrics, indent=2)))
  logger.info("run finished: %s", json.dumps(metrics))
  return metrics
