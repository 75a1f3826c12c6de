"""Self-labelling a folder of one's own images (`bin/label`): clusters.csv, contact sheets, a summary.

Two ways, both ending in K clusters per head for every image of the folder:

* from scratch (`label_folder(images, out)`): a short SeLa run on the folder (`train.run`, its run
  directory at `out/run`, exported as a SavedModel at `out/model` for assigning new images later). The
  clusters are the run's final self-labels; an image's confidence is the trained head's probability of
  its cluster.
* from an export (`from_export=DIR`, fast): the export's frozen embedding (its metadata's "embedding":
  AlexNet's pool5, a ResNet's features; or another output of its features signature) of every image,
  then new linear heads fitted by SeLa on them: K-means starts the labels, then `rounds` times a few
  epochs of cross-entropy on the labels and a Sinkhorn-Knopp labelling of the heads' log-probabilities
  (the same labeller as training). The confidence is the fitted head's probability.

`write_report(result, out)` writes, each file atomically:

  clusters.csv        path,head_0,confidence_0,... one row per image (paths relative to the folder)
  summary.txt         images, clusters, cluster sizes (smallest, largest), skipped files
  overview.png        a row per cluster of head 0: its most confident images
  sheets/head_{t}_cluster_{k:03d}.png   per cluster, its 64 most confident images
"""

import csv
import dataclasses
import io
import logging
import os
import time
from typing import Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from selabel_tf import contact_sheets
from selabel_tf import files

logger = logging.getLogger(__name__)

CLUSTERS_FILE = "clusters.csv"
SUMMARY_FILE = "summary.txt"
OVERVIEW_FILE = "overview.png"
SHEETS_DIR = "sheets"


@dataclasses.dataclass(frozen=True)
class FolderLabels:
  """The clusters of a folder's images.

  Attributes:
    files: N relative paths (the folder's sorted image files, undecodable ones skipped).
    images: uint8 [N, S, S, C] as decoded (for the contact sheets).
    labels: int32 [T, N], cluster per head.
    confidence: float32 [T, N], the head's probability of the image's cluster.
    num_clusters: K per head.
    skipped: (path, reason) of the files left out.
    method: "sela" (from scratch) or "export_features".
    layer: the export's features-signature output that was clustered (None from scratch).
  """
  files: Tuple[str, ...]
  images: np.ndarray
  labels: np.ndarray
  confidence: np.ndarray
  num_clusters: Tuple[int, ...]
  skipped: tuple
  method: str
  layer: Optional[str] = None


def export_outputs(export_dir: str, images: np.ndarray, signature: str, *, batch_size: int = 256,
                   verbose: int = 1) -> dict:
  """One pass of an export's `signature` ("features" or "probabilities") over uint8 images [N, H, W, C],
  in batches, with a progress bar: {output name: numpy [N, ...]}."""
  loaded = tf.saved_model.load(export_dir)
  function = loaded.signatures[signature]
  progress = keras.utils.Progbar(len(images), interval=5.0, unit_name="image") if verbose else None
  outputs = {}
  for start in range(0, len(images), batch_size):
    batch = function(images=tf.constant(images[start:start + batch_size]))
    for name, value in batch.items():
      outputs.setdefault(name, []).append(value.numpy())
    if progress is not None:
      progress.update(min(start + batch_size, len(images)))
  return {name: np.concatenate(parts) for name, parts in outputs.items()}


def fit_heads(features: np.ndarray, num_clusters: Sequence[int], *, lam: float = 10.0, rounds: int = 10,
              epochs_per_round: int = 3, batch_size: int = 256, learning_rate: float = 0.01,
              seed: int = 0, verbose: int = 1) -> Tuple[np.ndarray, np.ndarray]:
  """SeLa on frozen features: linear heads (BatchNorm without affine, then Dense, as the probes) trained
  by cross-entropy on labels that Sinkhorn-Knopp re-assigns after every round; K-means starts them.

  Args:
    features: float [N, D].
    num_clusters: K per head.
    lam: the labeller's lambda.
    rounds: training rounds, each followed by a labelling.
    epochs_per_round: epochs of cross-entropy per round.
    batch_size, learning_rate: of the heads' SGD (momentum 0.9).
    seed: seeds K-means, the heads' initialisation and the shuffling.
    verbose: 1 logs each round.

  Returns:
    (labels int32 [T, N], confidence float32 [T, N]: each head's probability of the example's label).
  """
  from selabel_tf import kmeans  # pylint: disable=g-import-not-at-top
  from selabel_tf import labeller  # pylint: disable=g-import-not-at-top
  features = np.asarray(features, np.float32)
  num_examples, dims = features.shape
  num_clusters = tuple(int(k) for k in num_clusters)
  labels = kmeans.assign_labels_kmeans(features, num_clusters, seed=seed,
                                       pca_dim=max(1, min(256, dims, num_examples - 1))).labels.astype(np.int32)
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((dims,), name="features")
  normalised = keras.layers.BatchNormalization(center=False, scale=False, name="features_bn")(inputs)
  heads = [keras.layers.Dense(k, name=f"head_{t}")(normalised) for t, k in enumerate(num_clusters)]
  model = keras.Model(inputs, heads, name="folder_heads")
  model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
                loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True)] * len(num_clusters))
  assignment = None
  for round_index in range(rounds):
    start = time.perf_counter()
    history = model.fit(features, tuple(labels), batch_size=batch_size, epochs=epochs_per_round,
                        shuffle=True, verbose=0)
    logits = model.predict(features, batch_size=4 * batch_size, verbose=0)
    logits = logits if isinstance(logits, list) else [logits]
    log_probs = [tf.nn.log_softmax(l).numpy() for l in logits]
    assignment = labeller.assign_labels(log_probs, lam, warm_start=assignment, seed=seed)
    changed = float(np.mean(assignment.labels != labels))
    labels = assignment.labels.astype(np.int32)
    if verbose:
      logger.info("fitting heads on frozen features: round %d/%d, loss %.3f, labels changed %.3f, %.1f s",
                  round_index + 1, rounds, history.history["loss"][-1], changed, time.perf_counter() - start)
  logits = model.predict(features, batch_size=4 * batch_size, verbose=0)
  logits = logits if isinstance(logits, list) else [logits]
  probabilities = [tf.nn.softmax(l).numpy() for l in logits]
  confidence = np.stack([p[np.arange(num_examples), labels[t]] for t, p in enumerate(probabilities)])
  return labels, confidence.astype(np.float32)


def label_folder(images_dir: str, out_dir: str, *, num_clusters: Sequence[int] = (10,),
                 from_export: Optional[str] = None, layer: Optional[str] = None,
                 image_size: Optional[int] = None, channels: Optional[int] = None,
                 skip_bad_images: bool = False, epochs: int = 20, architecture: str = "alexnet_small",
                 batch_size: int = 64, lam: float = 10.0, rounds: int = 10, seed: int = 0,
                 verbose: int = 1) -> FolderLabels:
  """Clusters every image under `images_dir` (see the module docstring); `out_dir` receives the run
  directory and its export (from scratch). The report is written by `write_report`. `layer` (with
  `from_export`) is the features-signature output to cluster; None means the export's embedding (an
  export written before exports named one: its "features").

  Raises:
    train.ConfigError: a folder that cannot be loaded (bad files, mixed sizes, ...) or an option that
      is not allowed, naming the flag.
  """
  from selabel_tf import export  # pylint: disable=g-import-not-at-top
  from selabel_tf import train  # pylint: disable=g-import-not-at-top
  from selabel_tf.data import image_folder  # pylint: disable=g-import-not-at-top
  num_clusters = tuple(int(k) for k in num_clusters)
  if not num_clusters or min(num_clusters) < 2:
    raise train.ConfigError(f"--clusters={','.join(map(str, num_clusters))} must be a comma list of "
                            f"ints > 1")
  # The from-scratch run's configuration; its validation checks the options both ways share.
  config = train.TrainConfig(
      dataset=images_dir, run_dir=os.path.join(out_dir, "run"), image_size=image_size,
      skip_bad_images=skip_bad_images, architecture=architecture, heads=",".join(map(str, num_clusters)),
      epochs=epochs, nopts=epochs, batch_size=batch_size, lam=lam, evaluate=False, seed=seed,
      export_dir=os.path.join(out_dir, "model"))
  config.validate()
  if rounds < 1:
    raise train.ConfigError(f"--rounds={rounds} must be >= 1")
  if from_export is not None:
    if not export.is_export(from_export):
      raise train.ConfigError(f"--from_export={from_export}: not a selabel_tf export (no "
                              f"{export.METADATA_PATH}; write one with bin/export or bin/train --export_dir)")
    metadata = export.load_metadata(from_export)
    image_size = image_size or metadata["input"]["resize_size"] or metadata["input"]["image_size"]
    channels = channels or metadata["input"]["channels"]
    layer = layer or metadata.get("embedding", "features")
    if layer not in metadata["signatures"]["features"]:
      raise train.ConfigError(f"--layer={layer}: the export's features signature has "
                              f"{', '.join(metadata['signatures']['features'])}")
  try:
    folder = image_folder.load_image_folder(images_dir, image_size=image_size, channels=channels or 3,
                                            on_bad="skip" if skip_bad_images else "error")
  except (FileNotFoundError, NotADirectoryError) as e:
    raise train.ConfigError(f"--images={images_dir}: {e}") from None
  except ValueError as e:
    raise train.data_error(e, "images", images_dir) from None
  num_examples = len(folder.files)
  for t, k in enumerate(num_clusters):
    if not 1 < k < num_examples:
      raise train.ConfigError(f"--clusters={','.join(map(str, num_clusters))}: head {t} has K={k}; need "
                              f"1 < K < the {num_examples} images of --images={images_dir}")
  logger.info("labelling %d images of %s into %s clusters (%s)", num_examples, images_dir,
              ",".join(map(str, num_clusters)),
              f"{layer} of {from_export}" if from_export else "SeLa from scratch")
  if from_export is not None:
    features = export_outputs(from_export, folder.images, "features", verbose=verbose)[layer]
    labels, confidence = fit_heads(features, num_clusters, lam=lam, rounds=rounds, seed=seed, verbose=verbose)
    return FolderLabels(folder.files, folder.images, labels, confidence, num_clusters, folder.skipped,
                        "export_features", layer)
  from selabel_tf import labels as labels_lib  # pylint: disable=g-import-not-at-top
  from selabel_tf.data import sources  # pylint: disable=g-import-not-at-top
  config = dataclasses.replace(config, batch_size=min(batch_size, num_examples))
  dataset, _ = sources.from_image_folder(folder, images_dir)
  train.run(config, data=(dataset, None))
  labels = labels_lib.read(os.path.join(config.run_dir, "labels.npz"))
  probabilities = export_outputs(config.export_dir, folder.images, "probabilities", verbose=verbose)
  confidence = np.stack([probabilities[f"head_{t}"][np.arange(num_examples), labels.labels[t]]
                         for t in range(len(num_clusters))]).astype(np.float32)
  return FolderLabels(folder.files, folder.images, labels.labels, confidence, num_clusters, folder.skipped,
                      "sela")


def clusters_csv(result: FolderLabels) -> str:
  """The clusters.csv text: path, then per head its cluster and confidence."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  heads = range(len(result.num_clusters))
  writer.writerow(["path"] + [name for t in heads for name in (f"head_{t}", f"confidence_{t}")])
  labels, confidence = result.labels.tolist(), result.confidence.tolist()
  for i, path in enumerate(result.files):
    writer.writerow([path] + [value for t in heads for value in (labels[t][i], f"{confidence[t][i]:.4f}")])
  return out.getvalue()


def summary(result: FolderLabels) -> str:
  """A short text summary: counts, cluster sizes per head, skipped files."""
  method = result.method + (f" ({result.layer})" if result.layer else "")
  lines = [f"{len(result.files)} images, {len(result.skipped)} skipped; method: {method}"]
  for t, k in enumerate(result.num_clusters):
    sizes = np.bincount(result.labels[t], minlength=k)
    lines.append(f"head {t}: {k} clusters, sizes {sizes.min()}..{sizes.max()} (smallest cluster "
                 f"{int(sizes.argmin())}, largest {int(sizes.argmax())}), mean confidence "
                 f"{float(result.confidence[t].mean()):.3f}")
    lines.append("  sizes: " + " ".join(f"{c}:{n}" for c, n in enumerate(sizes.tolist())))
  lines += [f"skipped {path}: {reason}" for path, reason in result.skipped]
  return "\n".join(lines) + "\n"


def _write_png(path, sheet):
  data = contact_sheets.png_bytes(sheet)

  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(data)

  files.write_atomically(path, write)


def write_report(result: FolderLabels, out_dir: str, *, per_cluster: int = 64, verbose: int = 1):
  """Writes clusters.csv, summary.txt, overview.png and sheets/ into `out_dir`, each file atomically
  (clusters.csv last); returns the overview's path."""
  tf.io.gfile.makedirs(f"{out_dir}/{SHEETS_DIR}")
  total = sum(result.num_clusters)
  progress = keras.utils.Progbar(total, interval=5.0, unit_name="sheet") if verbose else None
  done = 0
  for t, k in enumerate(result.num_clusters):
    for cluster in range(k):
      sheet = contact_sheets.cluster_sheet(result.images, result.labels[t], result.confidence[t], cluster,
                                           count=per_cluster)
      _write_png(f"{out_dir}/{SHEETS_DIR}/head_{t}_cluster_{cluster:03d}.png", sheet)
      done += 1
      if progress is not None:
        progress.update(done)
  overview_path = f"{out_dir}/{OVERVIEW_FILE}"
  _write_png(overview_path, contact_sheets.overview(result.images, result.labels[0], result.confidence[0],
                                                    result.num_clusters[0]))
  files.write_text(f"{out_dir}/{SUMMARY_FILE}", summary(result))
  files.write_text(f"{out_dir}/{CLUSTERS_FILE}", clusters_csv(result))
  return overview_path
