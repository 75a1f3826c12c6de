"""Evaluating a run directory (`bin/evaluate`): its model, rebuilt from config.json, on its dataset.

`restore(run_dir)` rebuilds a run's model with its weights (for `bin/export`);
`evaluate_export(export_dir)` evaluates an exported SavedModel the same way, through its signatures;
`evaluate_run_dir(run_dir)` rebuilds the run's `SelaModel` from its `config.json`, loads
`final.weights.h5` (or, for a run still going, the newest weights of `backup/`; or none with
`random_init=True`, a random-init network of the same configuration, seeded), loads the run's dataset
with its test split, runs the evaluation suite and writes the metrics as JSON, atomically.
"""

import dataclasses
import glob
import json
import os
from typing import Optional, Tuple

import keras
import tensorflow as tf

from selabel_tf import files
from selabel_tf import train
from selabel_tf.data import sources
from selabel_tf.evaluation import suite
from selabel_tf.modeling.sela import SelaModel

EVALUATION_FILE = "evaluation.json"
RANDOM_INIT_FILE = "evaluation_random_init.json"


class RunDirError(ValueError):
  """A run directory that cannot be evaluated; the message names the path and what is missing."""


def load_config(run_dir: str, **overrides) -> train.TrainConfig:
  """The run's TrainConfig from run_dir/config.json, with `overrides` (evaluation options) applied."""
  path = os.path.join(run_dir, "config.json")
  if not tf.io.gfile.isdir(run_dir):
    raise RunDirError(f"--run_dir={run_dir}: no such directory")
  if not tf.io.gfile.exists(path):
    raise RunDirError(f"--run_dir={run_dir}: no config.json (not a bin/train run directory)")
  return config_from_dict(json.loads(files.read_text(path)), **overrides)


def config_from_dict(values: dict, **overrides) -> train.TrainConfig:
  """A TrainConfig from its JSON dict (config.json, an export's run_config), `overrides` applied; keys
  this version does not know are left out."""
  known = {field.name for field in dataclasses.fields(train.TrainConfig)}
  values = {**train.BEFORE_THEIR_FLAG, **values}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
  return dataclasses.replace(train.TrainConfig(**values), **overrides)


def weights_path(run_dir: str) -> str:
  """final.weights.h5, else (a run still going) the newest weights BackupAndRestore wrote."""
  final = os.path.join(run_dir, "final.weights.h5")
  if os.path.isfile(final):
    return final
  backups = sorted(glob.glob(os.path.join(run_dir, "backup", "**", "*.weights.h5"), recursive=True),
                   key=os.path.getmtime)
  if backups:
    return backups[-1]
  raise RunDirError(f"--run_dir={run_dir}: no final.weights.h5 and no backup weights; pass "
                    f"--random_init to evaluate an untrained network of this configuration")


def build_model(config: train.TrainConfig, num_examples: int, image_size: int, channels: int,
                num_classes: Optional[int], weights: Optional[str] = None) -> SelaModel:
  """The run's SelaModel, built in the current strategy scope, with `weights` loaded (None: as initialised,
  seeded by the run's --seed)."""
  model = config.build_model((image_size, image_size, channels), num_examples, num_classes)
  model.build()
  if weights is not None:
    model.load_weights(weights)
  return model


@dataclasses.dataclass(frozen=True)
class Restored:
  """A run's configuration, training data and model (its weights loaded)."""
  config: train.TrainConfig
  dataset: sources.Dataset
  truth: Optional[sources.GroundTruth]
  model: SelaModel
  weights: Optional[str]  # None: random init


def restore(run_dir: str, *, random_init: bool = False,
            data: Optional[Tuple[sources.Dataset, Optional[sources.GroundTruth]]] = None, **overrides) -> Restored:
  """The run's model with its final (or newest backup) weights, and the data it was trained on
  (`data`: that (dataset, truth), already loaded by the caller; not read again).

  Raises:
    RunDirError: a missing run directory, config or weights file.
    train.ConfigError: the run's dataset cannot be loaded.
  """
  config = load_config(run_dir, **overrides)
  config.validate()
  weights = None if random_init else weights_path(run_dir)
  keras.utils.set_random_seed(config.seed)
  try:
    dataset, truth = data or train.load_dataset(config)
  except train.ConfigError as e:
    raise train.ConfigError(f"--run_dir={run_dir}: its {e}") from None
  image_size = config.image_size or int(dataset.images.shape[1])
  model = build_model(config, dataset.num_examples, image_size, dataset.channels,
                      None if truth is None else truth.num_classes, weights)
  return Restored(config, dataset, truth, model, weights)


def evaluate_run_dir(run_dir: str, *, random_init: bool = False, output: Optional[str] = None,
                     strategy: Optional[tf.distribute.Strategy] = None, verbose: int = 1,
                     **overrides) -> dict:
  """Evaluates the run's model (or a random-init one) and writes the metrics; returns them.

  Args:
    run_dir: a bin/train run directory.
    random_init: evaluate an untrained network of the run's configuration (seeded by its --seed).
    output: where to write the JSON (default: run_dir/evaluation.json, or
      run_dir/evaluation_random_init.json with `random_init`).
    strategy: default: the run's --strategy.
    verbose: 1 shows progress bars.
    **overrides: TrainConfig evaluation fields (knn_k, probe_epochs, ...) replacing the run's.

  Raises:
    RunDirError: a missing run directory, config or weights file.
    train.ConfigError: an override that is not allowed, or a dataset without a labelled test split.
  """
  config = load_config(run_dir, **overrides)
  config.validate()
  path = None if random_init else weights_path(run_dir)
  keras.utils.set_random_seed(config.seed)
  strategy = strategy or train.make_strategy(config.strategy)
  data = train.build_evaluation_data(config)
  with strategy.scope():
    model = build_model(config, data.train.num_examples, data.image_size, data.train.channels,
                        data.train_truth.num_classes, path)
  metrics = suite.evaluate_model(model, data, train.evaluation_options(config), verbose=verbose)
  metrics.update(run_dir=run_dir, weights=path or "random_init", random_init=random_init)
  if random_init:  # an untrained network's labels are the initial ones: not a result
    metrics = {k: v for k, v in metrics.items() if not k.startswith("cluster_selabel/")}
  output = output or os.path.join(run_dir, RANDOM_INIT_FILE if random_init else EVALUATION_FILE)
  if strategy.extended.should_checkpoint:
    files.write_text(output, json.dumps(metrics, indent=2))
  return metrics


def evaluate_export(export_dir: str, *, output: Optional[str] = None,
                    strategy: Optional[tf.distribute.Strategy] = None, verbose: int = 1,
                    **overrides) -> dict:
  """Evaluates an exported SavedModel as `evaluate_run_dir` evaluates its run: the same suite on the
  same data (its run's dataset, split, imbalance and subset), through the export's own signatures (its
  in-graph transform, its pooled activations), so the numbers agree with the run directory's. The
  self-labels are the run's, not the export's: "cluster_selabel/..." needs the run directory. Writes
  the metrics to `output` when given; returns them.

  Raises:
    RunDirError: not an export, or one without its run's configuration.
    train.ConfigError: an override that is not allowed, or a dataset without a labelled test split.
  """
  from selabel_tf import export  # pylint: disable=g-import-not-at-top
  if not export.is_export(export_dir):
    raise RunDirError(f"--export_dir={export_dir}: not a selabel_tf export (no {export.METADATA_PATH})")
  metadata = export.load_metadata(export_dir)
  if "run_config" not in metadata:
    raise RunDirError(f"--export_dir={export_dir}: its metadata does not name the run it came from; "
                      f"evaluate that run with --run_dir, or re-export it with bin/export")
  config = config_from_dict(metadata["run_config"], **overrides)
  config.validate()
  if config.probe_mode != "cached":
    raise train.ConfigError(f"--probe_mode={config.probe_mode}: an export is evaluated on its pooled "
                            f"activations; use --probe_mode=cached")
  keras.utils.set_random_seed(config.seed)
  strategy = strategy or train.make_strategy(config.strategy)
  data = dataclasses.replace(train.build_evaluation_data(config, metadata["input"]["image_size"]),
                             raw_images=True)
  with strategy.scope():
    activations, heads = export.as_keras_models(export_dir)
  metrics = suite.evaluate_model(heads, data, train.evaluation_options(config), activations=activations,
                                 verbose=verbose)
  metrics.update(export_dir=str(export_dir), run_dir=metadata.get("run_dir"))
  if output and strategy.extended.should_checkpoint:
    files.write_text(output, json.dumps(metrics, indent=2))
  return metrics
