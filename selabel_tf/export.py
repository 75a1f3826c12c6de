"""A trained SeLa model as a TF SavedModel: features, cluster probabilities and assignments for any TF program.

`export_model(model, export_dir, transform)` writes, through Keras 3's `keras.export.ExportArchive`, a
SavedModel whose serving signatures all take `images`, uint8 [B, H, W, C] (C the model's channels, H and W
any size), and run the evaluation transform inside the graph: resize so that the shorter side is the
transform's resize size (bilinear, antialiased, as PIL; the identity for images of the training size of a
small-image dataset), centre crop to the model's input size, scale to [0, 1], normalise by the training
data's mean and std. The signatures:

  features       {"features": float32 [B, D], and one float32 [B, d_layer] per probe layer: the layer's
                 activation pooled as the linear probes read it (see selabel_tf.evaluation.probes);
                 always the backbone's embedding, the metadata's "embedding" (AlexNet: "pool5", the
                 conv trunk's output; ResNet: "features"), the representation to use downstream}
  probabilities  {"head_0": float32 [B, K_0], ..., "head_{T-1}"}: each head's softmax
  assign         {"clusters": int32 [B, T], each head's argmax; "confidence": float32 [B, T], its probability}
  metadata       (no input) {"json": the metadata below, a string}

`assets.extra/metadata.json` holds the same metadata: architecture, heads, input spec and transform,
normalisation, dataset, the commit, the embedding, the probe layers and their dimensions. The export is
written beside `export_dir` and moved into place (`selabel_tf.files.replace_directory`), through `tf.io.gfile`.

Downstream, with no selabel_tf installed:

    loaded = tf.saved_model.load(export_dir)
    loaded.signatures["features"](images=uint8_batch)[metadata["embedding"]]
    keras.layers.TFSMLayer(export_dir, call_endpoint="features", trainable=False)

`export_run_dir(run_dir, export_dir)` exports a `bin/train` run directory (`bin/export`, `bin/train
--export_dir`).
"""

import datetime
import json
import logging
import os
import subprocess
import time
from typing import Dict, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from selabel_tf import files
from selabel_tf.data import augment
from selabel_tf.evaluation import probes as probes_lib
from selabel_tf.modeling import backbones

logger = logging.getLogger(__name__)

SIGNATURES = ("features", "probabilities", "assign", "metadata")
METADATA_PATH = os.path.join("assets.extra", "metadata.json")
FORMAT = "selabel_tf.export/1"


def git_commit() -> Optional[str]:
  """The commit of the selabel_tf checkout this code runs from (None outside a git checkout); '+dirty' when
  tracked files differ from it."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "")


def describe_transform(transform: augment.AugmentConfig) -> str:
  size, resize = transform.image_size, transform.resize_size
  return (f"uint8 [B, H, W, {transform.channels}] images of any size: resized so that the shorter side is "
          f"{resize} px (bilinear, antialiased), centre-cropped to {size}x{size}, scaled to [0, 1], "
          f"normalised by the mean and std")


def export_model(model, export_dir: str, transform: augment.AugmentConfig, *,
                 probe_layers: Optional[Sequence[str]] = None, metadata: Optional[Dict] = None) -> Dict:
  """Writes `model` (a built `SelaModel`) as a SavedModel at `export_dir`; returns its metadata.

  Args:
    model: the model; its current weights are exported.
    export_dir: a local or gfile path; an existing export there is replaced whole.
    transform: the evaluation transform of the training data (`Dataset.augment_config(size, "none")`).
    probe_layers: the pooled activations `features` returns beside "features" (default: every probe
      layer of the architecture); the embedding layer is always among them.
    metadata: entries added to the metadata (dataset, run directory, ...).

  Raises:
    ValueError: a probe layer the backbone does not have; a transform whose size or channels are not
      the model's.
  """
  size, _, channels = model.image_shape
  if transform.image_size != size or transform.channels != channels:
    raise ValueError(f"the transform makes {transform.image_size} px images with {transform.channels} "
                     f"channels, the model takes {size} px with {channels}")
  embedding = backbones.embedding_layer(model.architecture)
  chosen = (*(probe_layers or probes_lib.default_layers(model.architecture)), embedding)
  layers = tuple(layer for layer in dict.fromkeys(chosen) if layer != probes_lib.FEATURES)
  pooling = probes_lib.activation_pooling(model.backbone, layers)
  spec = tf.TensorSpec([None, None, None, channels], tf.uint8, name="images")

  def activations(images):
    return model.backbone(augment.evaluation_batch(images, transform), training=False)

  def probabilities_of(features):
    return [tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1) for logits in model.heads(features)]

  def features_fn(images):
    outputs = activations(images)
    return {probes_lib.FEATURES: tf.cast(outputs[probes_lib.FEATURES], tf.float32), **pooling(outputs)}

  def probabilities_fn(images):
    probabilities = probabilities_of(activations(images)[probes_lib.FEATURES])
    return {f"head_{t}": p for t, p in enumerate(probabilities)}

  def assign_fn(images):
    probabilities = probabilities_of(activations(images)[probes_lib.FEATURES])
    return {"clusters": tf.stack([tf.argmax(p, axis=-1, output_type=tf.int32) for p in probabilities], 1),
            "confidence": tf.stack([tf.reduce_max(p, axis=-1) for p in probabilities], 1)}

  full_metadata = {
      "format": FORMAT,
      "architecture": model.architecture,
      "heads": list(model.num_clusters),
      "input": {"name": "images", "dtype": "uint8", "shape": [None, None, None, channels],
                "image_size": size, "resize_size": transform.resize_size, "channels": channels,
                "transform": describe_transform(transform)},
      "normalization": {"mean": list(transform.mean or ()), "std": list(transform.std or ())},
      "embedding": embedding,
      "signatures": {
          "features": {probes_lib.FEATURES: int(model.backbone.output[probes_lib.FEATURES].shape[-1]),
                       **pooling.dimensions()},
          "probabilities": {f"head_{t}": k for t, k in enumerate(model.num_clusters)},
          "assign": {"clusters": len(model.num_clusters), "confidence": len(model.num_clusters)},
      },
      "commit": git_commit(),
      "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      **(metadata or {}),
  }
  text = json.dumps(full_metadata, indent=2)

  def metadata_fn():
    return {"json": tf.constant(text)}

  # Not `archive.track(model)`: the endpoints track the variables they use, and tracking the model too
  # writes every weight twice (keras-team/keras#23553: its keras.Variable wrappers and the endpoints' tf
  # variables are different trackables), doubling the export and its consumers' memory.
  archive = keras.export.ExportArchive()
  archive.add_endpoint("features", features_fn, input_signature=[spec])
  archive.add_endpoint("probabilities", probabilities_fn, input_signature=[spec])
  archive.add_endpoint("assign", assign_fn, input_signature=[spec])
  archive.add_endpoint("metadata", metadata_fn, input_signature=[])

  def write(directory):
    archive.write_out(directory, verbose=False)
    tf.io.gfile.makedirs(f"{directory}/assets.extra")
    with tf.io.gfile.GFile(f"{directory}/{METADATA_PATH}", "w") as f:
      f.write(text)

  start = time.perf_counter()
  files.replace_directory(export_dir, write)
  logger.info("exported %s to %s in %.1f s (signatures %s)", model.name, export_dir,
              time.perf_counter() - start, ", ".join(SIGNATURES))
  return full_metadata


def load_metadata(export_dir: str) -> Dict:
  """The metadata of an export (its assets.extra/metadata.json)."""
  path = f"{str(export_dir).rstrip('/')}/{METADATA_PATH}"
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{export_dir}: no {METADATA_PATH} (not a selabel_tf export)")
  return json.loads(files.read_text(path))


def is_export(path: str) -> bool:
  """Whether `path` is a selabel_tf export directory."""
  return tf.io.gfile.exists(f"{str(path).rstrip('/')}/{METADATA_PATH}")


def export_run_dir(run_dir: str, export_dir: str, *, probe_layers: Optional[Sequence[str]] = None,
                   data=None) -> Dict:
  """Exports a bin/train run directory's final weights (or newest backup); returns the metadata. `data`:
  the run's (dataset, truth) where the caller has them loaded (bin/train), else read again.

  Raises:
    run_dir.RunDirError: a missing run directory, config or weights file.
  """
  from selabel_tf.evaluation import run_dir as run_dir_lib  # pylint: disable=g-import-not-at-top
  restored = run_dir_lib.restore(run_dir, data=data)
  transform = restored.dataset.augment_config(restored.model.image_shape[0], "none")
  config = restored.config
  return export_model(restored.model, export_dir, transform,
                      probe_layers=probe_layers or config.probe_layers or None,
                      metadata={"dataset": config.dataset, "split": config.split,
                                "num_examples": restored.dataset.num_examples,
                                "run_dir": str(run_dir), "weights": restored.weights,
                                "run_config": json.loads(config.to_json())})


def as_keras_models(export_dir: str) -> Tuple[keras.Model, keras.Model]:
  """(activations, heads): functional Keras models over an export's signatures, from uint8 images
  [B, H, W, C] (any size; the export transforms them): `activations` returns the `features` signature's
  dict (features and the pooled probe layers), `heads` the list of per-head probabilities float32
  [B, K_t]. Build them inside a strategy's scope to run them distributed. Used by the evaluation of an
  export (`bin/evaluate --export_dir`)."""
  metadata = load_metadata(export_dir)
  images = keras.Input((None, None, metadata["input"]["channels"]), dtype="uint8", name="images")
  features = keras.layers.TFSMLayer(export_dir, call_endpoint="features", name="export_features")(images)
  # In the metadata's order ("features", then the probe layers shallowest first), not the signature's
  # arbitrary one: the probes are seeded by position, so the order fixes their initialisation.
  activations = keras.Model(images, {name: features[name] for name in metadata["signatures"]["features"]},
                            name="export_activations")
  probabilities = keras.layers.TFSMLayer(export_dir, call_endpoint="probabilities",
                                         name="export_probabilities")(images)
  heads = keras.Model(images, [probabilities[f"head_{t}"] for t in range(len(metadata["heads"]))],
                      name="export_heads")
  return activations, heads
