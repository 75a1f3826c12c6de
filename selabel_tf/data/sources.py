"""Indexed image datasets: tensorflow-datasets by name, MNIST-format IDX files, image folders, .npz.

Self-labelling looks labels up by example index, so every example carries a stable index in [0, N):

* tfds: the position in the split as tfds reads it with `shuffle_files=False` and files read one after
  another (`interleave_cycle_length=1`); tfds fixes that order when it prepares the data.
* IDX files (`*-images-idx3-ubyte.gz`): the position in the file.
* image folders: the position in the sorted list of relative paths (see `image_folder`).
* .npz: the row.
* imbalanced subsets (paper Table 8) and random subsets (for screening): the kept examples are re-indexed
  0..N'-1 in their original order; `Dataset.original_index` maps back. A subset is a function of the
  seed, so restarts see the same.

Shuffling and sharding happen downstream (`selabel_tf.data.pipeline`) on these indices, so the index of
an example never depends on them.

Ground truth stays beside the data, never in it: `load` returns a `Dataset` (images only; what training
code receives) and, separately, `GroundTruth` for evaluation.
"""

import dataclasses
import gzip
import logging
import os
from typing import Any, Callable, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)

TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped", "stl10", "imagenet2012", "fashion_mnist", "mnist")
DEBIAN_IDX_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
IMBALANCE_MODES = ("none", "light", "heavy")
# Images of at most this many bytes are decoded once and cached in memory.
DEFAULT_CACHE_BYTES = 8 << 30
_IDX_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
# Which augmentation family and normalisation a dataset uses (see selabel_tf.data.augment).
_KIND = {"imagenet2012": "imagenet"}
_NORMALIZATION_KEY = {"imagenet2012": "imagenet", "svhn_cropped": "svhn"}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images to learn from, indexed 0..N-1. No labels: training code cannot reach the ground truth.

  A dataset too large for the in-memory cache (ImageNet) is streamed instead: `images` is None and
  `stream()` yields (index, uint8 image [H, W, C]) for every example in index order (tfds' file order).

  Attributes:
    name: dataset name (tfds name, or the folder/file name).
    images: uint8 [N, H, W, C], decoded; None when streamed.
    original_index: int64 [N], each example's position in the source before any subsetting.
    kind: "small" (CIFAR-like, 28-96 px) or "imagenet": which augmentation parameters apply.
    origin: where the images were read from (path or tfds data dir), for logs.
    stream: for a streamed dataset, a callable returning a tf.data.Dataset of (index, image).
    image_channels: for a streamed dataset, C.
    files: image folders: each example's file, as a POSIX path relative to `origin`; else None.
  """
  name: str
  images: Optional[np.ndarray]
  original_index: np.ndarray
  kind: str
  origin: str
  stream: Optional[Callable[[], Any]] = None
  image_channels: Optional[int] = None
  files: Optional[Tuple[str, ...]] = None

  def select(self, kept: np.ndarray) -> "Dataset":
    """The examples at the sorted positions `kept`, re-indexed 0..len(kept)-1 (original_index and files
    follow them)."""
    if self.streamed:
      raise ValueError(f"dataset {self.name!r} is streamed; subsets need it cached in memory")
    return dataclasses.replace(self, images=self.images[kept], original_index=self.original_index[kept],
                               files=None if self.files is None else tuple(self.files[i] for i in kept))

  def source_ids(self) -> np.ndarray:
    """Each example's id in its source: its file path (image folders), else its original index."""
    return np.asarray(self.files if self.files is not None else self.original_index)

  @property
  def num_examples(self) -> int:
    return int(self.original_index.shape[0])

  @property
  def channels(self) -> int:
    return int(self.images.shape[-1]) if self.images is not None else int(self.image_channels)

  @property
  def streamed(self) -> bool:
    return self.images is None

  def normalization(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel (mean, std) in [0, 1] units: the published values for known datasets, else measured."""
    from selabel_tf.data import augment  # pylint: disable=g-import-not-at-top
    known = augment.NORMALIZATION.get(_NORMALIZATION_KEY.get(self.name, self.name))
    if known is not None and len(known[0]) == self.channels:
      return known
    if self.streamed:
      return augment.NORMALIZATION["imagenet"] if self.channels == 3 else ((0.5,), (0.25,))
    pixels = self.images.reshape(-1, self.channels)[::max(1, self.images.size // self.channels // 10**7)]
    pixels = pixels.astype(np.float64) / 255.0
    return tuple(pixels.mean(0).tolist()), tuple(np.maximum(pixels.std(0), 1e-3).tolist())

  def augment_config(self, image_size: Optional[int] = None, strength: str = "paper"):
    """The official code's augmentation for this dataset (see `augment.config_for`)."""
    from selabel_tf.data import augment  # pylint: disable=g-import-not-at-top
    mean, std = self.normalization()
    if image_size is None:
      if self.streamed:
        raise ValueError(f"dataset {self.name!r} is streamed (images of varying size): give image_size")
      image_size = int(self.images.shape[1])
    return augment.config_for(self.kind, image_size, self.channels, mean, std, strength)


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """True classes of a `Dataset`'s examples, for evaluation only.

  Attributes:
    labels: int64 [N], aligned with the dataset's indices.
    class_names: tuple of str.
  """
  labels: np.ndarray
  class_names: Tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def load(source: str,
         *,
         split: str = "train",
         data_dir: Optional[str] = None,
         download: bool = False,
         image_size: Optional[int] = None,
         channels: Optional[int] = None,
         holdout_fraction: Optional[float] = None,
         imbalance: str = "none",
         imbalance_class: Optional[int] = None,
         subset: Optional[int] = None,
         seed: int = 0,
         on_bad: str = "error",
         cache_bytes: int = DEFAULT_CACHE_BYTES) -> Tuple[Dataset, Optional[GroundTruth]]:
  """Loads an indexed dataset and, separately, its ground truth (None when unlabelled).

  Args:
    source: a tfds name (one of TFDS_NAMES), a directory of MNIST-format IDX files, an image folder,
      or a .npz file (arrays `images` [N, H, W(, C)] uint8 and optionally `labels` [N]).
    split: "train" or "test" (tfds also accepts its own split names, e.g. stl10's "unlabelled").
    data_dir: tfds data dir (default: tfds' own, usually ~/tensorflow_datasets).
    download: let tfds download and prepare the data if it is not prepared (needs internet).
    image_size: image folders only: the side S all images are resized/cropped to (None: the images'
      own, when they share one size; see `image_folder`).
    channels: image folders only: 1 or 3 (default 3).
    holdout_fraction: image folders without split subfolders: fraction held out as "test".
    imbalance: "none", "light" (remove 50% of one class) or "heavy" (remove 10% of the first class,
      20% of the second, ... capped at 90%): the imbalanced CIFAR-10 subsets of paper Table 8.
    imbalance_class: the class that "light" halves (default: the last one, truck in CIFAR-10).
    subset: keep a random subset of this many examples (after any imbalance; None or 0: all), chosen
      without looking at the classes, for quick screening runs.
    seed: seed of the imbalance subset and of the holdout split.
    on_bad: image folders: "error" (default) or "skip" unreadable images (one warning lists them).
    cache_bytes: tfds splits of at most this many decoded bytes are cached in memory; larger ones
      (ImageNet) are streamed from the tfds files.

  Returns:
    (Dataset, GroundTruth or None).

  Raises:
    FileNotFoundError / ValueError: naming the source and what would make it work.
  """
  if imbalance not in IMBALANCE_MODES:
    raise ValueError(f"imbalance must be one of {IMBALANCE_MODES}, got {imbalance!r}")
  if source in TFDS_NAMES:
    dataset, truth = _load_tfds_or_fallback(source, split, data_dir, download, cache_bytes)
  elif source.endswith(".npz"):
    dataset, truth = _load_npz(source)
  elif os.path.isdir(source) and _idx_files(source, split):
    dataset, truth = _load_idx_dir(source, split)
  elif os.path.isdir(source):
    dataset, truth = _load_image_folder(source, split, image_size, channels, holdout_fraction, seed,
                                        on_bad)
  elif os.path.exists(source):
    raise ValueError(f"dataset {source!r}: not a directory or a .npz file; expected one of the tfds "
                     f"names {TFDS_NAMES}, an IDX directory, an image folder or a .npz file")
  else:
    raise FileNotFoundError(f"dataset {source!r}: no such file or directory, and not one of the tfds "
                            f"names {TFDS_NAMES}")
  if imbalance != "none":
    if truth is None:
      raise ValueError(f"imbalance={imbalance!r} needs class labels, and {source!r} has none")
    dataset, truth = imbalanced_subset(dataset, truth, imbalance, imbalance_class, seed)
  if subset:
    dataset, truth = random_subset(dataset, truth, subset, seed)
  return dataset, truth


def random_subset(dataset: Dataset, truth: Optional[GroundTruth], size: int,
                  seed: int = 0) -> Tuple[Dataset, Optional[GroundTruth]]:
  """`size` examples drawn uniformly without replacement (a function of `seed`), re-indexed 0..size-1
  in their original order; the classes are not looked at.

  Raises:
    ValueError: `size` is not in [1, N], or the dataset is streamed.
  """
  if not 1 <= size <= dataset.num_examples:
    raise ValueError(f"subset={size} must be between 1 and the {dataset.num_examples} examples of "
                     f"{dataset.name!r}")
  if dataset.streamed:
    raise ValueError(f"subset={size}: dataset {dataset.name!r} is streamed; subsets need it cached in memory")
  kept = np.sort(np.random.default_rng([seed, 1]).choice(dataset.num_examples, size=size, replace=False))
  return dataset.select(kept), (None if truth is None else dataclasses.replace(truth, labels=truth.labels[kept]))


def imbalanced_subset(dataset: Dataset, truth: GroundTruth, mode: str,
                      imbalance_class: Optional[int] = None,
                      seed: int = 0) -> Tuple[Dataset, GroundTruth]:
  """The imbalanced subsets of paper Table 8, deterministic given `seed`; logs the class counts.

  "light" removes 50% of one class (`imbalance_class`, default the last: truck in CIFAR-10); "heavy"
  removes 10% of class 0, 20% of class 1, and so on, capped at 90% so that no class disappears. Kept
  examples are re-indexed 0..N'-1 in their original order.
  """
  if dataset.streamed:
    raise ValueError(f"imbalance={mode!r}: dataset {dataset.name!r} is streamed; imbalanced subsets "
                     "need it cached in memory")
  num_classes = truth.num_classes
  fractions = np.zeros(num_classes)
  if mode == "light":
    cls = num_classes - 1 if imbalance_class is None else imbalance_class
    if not 0 <= cls < num_classes:
      raise ValueError(f"imbalance_class must be in [0, {num_classes}), got {cls}")
    fractions[cls] = 0.5
  elif mode == "heavy":
    fractions = np.minimum(0.1 * np.arange(1, num_classes + 1), 0.9)
  else:
    raise ValueError(f"imbalance mode must be 'light' or 'heavy', got {mode!r}")
  rng = np.random.default_rng(seed)
  keep = np.ones(dataset.num_examples, bool)
  for cls in range(num_classes):
    members = np.flatnonzero(truth.labels == cls)
    drop = int(round(fractions[cls] * members.size))
    keep[rng.choice(members, size=drop, replace=False)] = False
  kept = np.flatnonzero(keep)
  counts = np.bincount(truth.labels[kept], minlength=num_classes)
  logger.info("%s imbalance of %s: class counts %s (%d of %d examples kept)", mode, dataset.name,
              counts.tolist(), kept.size, dataset.num_examples)
  return (dataset.select(kept),
          dataclasses.replace(truth, labels=truth.labels[kept]))


# -------------------------------------------------------------------------------------------------
# tensorflow-datasets


def _load_tfds_or_fallback(name, split, data_dir, download, cache_bytes=DEFAULT_CACHE_BYTES):
  """tfds name: a prepared tfds dir; for fashion_mnist also Debian's IDX files; else a download."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return _from_tfds_builder(name, builder, split, cache_bytes)
  idx_dir = DEBIAN_IDX_DIRS.get(name)
  if idx_dir and _idx_files(idx_dir, split):
    logger.info("%s: no prepared tfds data in %s; reading Debian's IDX files in %s", name,
                builder.data_dir, idx_dir)
    return _load_idx_dir(idx_dir, split, name=name)
  if download:
    builder.download_and_prepare()
    return _from_tfds_builder(name, builder, split, cache_bytes)
  ways = [f"prepare it with tfds into {os.path.dirname(os.path.dirname(builder.data_dir))} "
          f"(tfds build {name}, or pass --data_dir to a prepared one)"]
  if idx_dir:
    ways.append(f"install Debian's package dataset-{name.replace('_', '-')} (IDX files in {idx_dir})")
  ways.append("allow a download (download=True / --download; needs internet)")
  raise FileNotFoundError(f"dataset {name!r} (split {split!r}) is not available offline: "
                          + "; or ".join(ways))


def _from_tfds_builder(name, builder, split, cache_bytes=DEFAULT_CACHE_BYTES):
  """A prepared tfds split, in tfds' deterministic file order: cached in memory, or streamed."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if split not in builder.info.splits:
    raise ValueError(f"dataset {name!r} has splits {sorted(builder.info.splits)}, not {split!r}")
  info = builder.info
  num_examples = info.splits[split].num_examples
  shape = info.features["image"].shape
  read_config = tfds.ReadConfig(interleave_cycle_length=1)
  has_label = "label" in info.features
  kind = _KIND.get(name, "small")
  streamed = None in shape or num_examples * int(np.prod(shape)) > cache_bytes
  images, labels = None, []
  if streamed:
    # Labels only: the images stay encoded, so this pass is cheap.
    if has_label:
      ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                              decoders={"image": tfds.decode.SkipDecoding()})
      for batch in ds.map(lambda ex: ex["label"]).batch(65536).as_numpy_iterator():
        labels.append(batch)
  else:
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
    images = []
    for batch in ds.batch(4096).prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
      images.append(batch["image"])
      if has_label:
        labels.append(batch["label"])
    images = np.concatenate(images)
  truth = None
  if has_label:
    labels = np.concatenate(labels).astype(np.int64)
    if (labels >= 0).all():  # stl10's unlabelled split marks its labels -1
      truth = GroundTruth(labels, tuple(info.features["label"].names))

  def stream():
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
    return ds.enumerate().map(lambda i, ex: (i, ex["image"]), num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)

  if streamed:
    logger.info("%s split %s: %d images streamed from %s (larger than the %d GiB cache)", name, split,
                num_examples, builder.data_dir, cache_bytes >> 30)
  dataset = Dataset(name=name, images=images, original_index=np.arange(num_examples, dtype=np.int64),
                    kind=kind, origin=builder.data_dir, stream=stream if streamed else None,
                    image_channels=int(shape[-1]))
  return dataset, truth


def prepare_tfds_from_idx(name: str, idx_dir: str, data_dir: str):
  """Prepares tfds' real `name` ("fashion_mnist" or "mnist") from local IDX .gz files, offline.

  The builder's own split generators and example parser run unchanged; only the download is redirected
  to the local files (Debian's files are recompressed, so tfds' checksums would reject them as a
  manual download). Returns the prepared builder; a prepared dir is reused.
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import posixpath  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import urllib.parse  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tree  # pylint: disable=g-import-not-at-top

  local = {}
  for split in ("train", "test"):
    files = _idx_files(idx_dir, split)
    if not files:
      raise FileNotFoundError(f"{idx_dir}: no IDX files for split {split!r}")
    local.update({os.path.basename(f): f for f in files})
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder

  def to_local(url):
    filename = posixpath.basename(urllib.parse.urlparse(os.fspath(url)).path)
    if filename not in local:
      raise ValueError(f"{name}: no local IDX file for {url!r} in {idx_dir}")
    return local[filename]

  def download_and_extract(self, url_or_urls):
    return self.extract(tree.map_structure(to_local, url_or_urls))

  def no_download(self, *args, **kwargs):
    raise RuntimeError(f"{name}: unexpected download attempt {args!r}")

  config = tfds.download.DownloadConfig(try_download_gcs=False,
                                        compute_stats=tfds.download.ComputeStatsMode.SKIP)
  manager = tfds.download.DownloadManager
  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(manager, "download_and_extract", download_and_extract))
    stack.enter_context(mock.patch.object(manager, "download", no_download))
    scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="idx_", dir=data_dir))
    builder.download_and_prepare(download_dir=scratch, download_config=config)
  return builder


# -------------------------------------------------------------------------------------------------
# IDX files, .npz, image folders


def _idx_files(directory, split):
  prefix = _IDX_SPLIT_PREFIX.get(split)
  if prefix is None:
    return None
  images = os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz")
  labels = os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz")
  return (images, labels) if os.path.isfile(images) and os.path.isfile(labels) else None


def read_idx(path: str) -> np.ndarray:
  """Reads one (optionally gzipped) IDX file of unsigned bytes: images [N, H, W] or labels [N]."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"{path}: cannot read IDX file ({e})") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}, "
                     "expected 00000801 or 00000803)")
  ndim = data[3]
  header = 4 + 4 * ndim
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  expected = header + int(np.prod(dims))
  if len(data) != expected:
    raise ValueError(f"{path}: IDX header promises {dims} ({expected} bytes), file has {len(data)}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _load_idx_dir(directory, split, name=None):
  files = _idx_files(directory, split)
  if not files:
    raise FileNotFoundError(f"{directory}: no {_IDX_SPLIT_PREFIX.get(split, split)}-images-idx3-ubyte.gz "
                            f"and -labels-idx1-ubyte.gz for split {split!r}")
  images, labels = read_idx(files[0]), read_idx(files[1])
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
  name = name or os.path.basename(os.path.normpath(directory)).replace("-", "_")
  num_classes = int(labels.max()) + 1
  class_names = _FASHION_MNIST_CLASSES if name == "fashion_mnist" else tuple(map(str, range(num_classes)))
  dataset = Dataset(name=name, images=images[..., None], original_index=np.arange(len(images), dtype=np.int64),
                    kind="small", origin=directory)
  return dataset, GroundTruth(labels.astype(np.int64), class_names)


_FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                          "Sneaker", "Bag", "Ankle boot")


def _load_npz(path):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such .npz file")
  with np.load(path) as arrays:
    if "images" not in arrays:
      raise ValueError(f"{path}: needs an array 'images' [N, H, W(, C)] uint8; has {sorted(arrays)}")
    images = arrays["images"]
    labels = arrays["labels"] if "labels" in arrays else None
  if images.dtype != np.uint8 or images.ndim not in (3, 4):
    raise ValueError(f"{path}: 'images' must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} "
                     f"{images.shape}")
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[-1] not in (1, 3):
    raise ValueError(f"{path}: 'images' must have 1 or 3 channels, got {images.shape[-1]}")
  truth = None
  if labels is not None:
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
      raise ValueError(f"{path}: 'labels' must be non-negative integers [N={len(images)}], got "
                       f"{labels.dtype} {labels.shape}")
    truth = GroundTruth(labels.astype(np.int64), tuple(map(str, range(int(labels.max()) + 1))))
  name = os.path.splitext(os.path.basename(path))[0]
  return Dataset(name=name, images=images, original_index=np.arange(len(images), dtype=np.int64),
                 kind="small", origin=path), truth


def _load_image_folder(path, split, image_size, channels, holdout_fraction, seed, on_bad):
  from selabel_tf.data import image_folder  # pylint: disable=g-import-not-at-top
  has_split_dirs = any(os.path.isdir(os.path.join(path, d)) for d in image_folder.SPLIT_NAMES)
  if not has_split_dirs and holdout_fraction is None:
    split = None  # one folder, no holdout: every image is in the (only) split
  folder = image_folder.load_image_folder(path, image_size=image_size, channels=channels or 3,
                                          split=split, holdout_fraction=holdout_fraction, seed=seed,
                                          on_bad=on_bad)
  root = path if split is None or not os.path.isdir(os.path.join(path, split)) else os.path.join(path, split)
  return from_image_folder(folder, path, origin=root)


def from_image_folder(folder, path: str, origin: Optional[str] = None
                      ) -> Tuple[Dataset, Optional[GroundTruth]]:
  """(dataset, truth) of `image_folder.ImageFolder` `folder` loaded from `path` (the dataset is named
  after it; `origin`: the directory read, default `path`); truth: None without class subfolders."""
  dataset = Dataset(name=os.path.basename(os.path.normpath(path)), images=folder.images,
                    original_index=np.arange(len(folder.images), dtype=np.int64),
                    kind="imagenet" if folder.images.shape[1] >= 128 else "small", origin=origin or path,
                    files=folder.files)
  truth = None if folder.ground_truth is None else GroundTruth(folder.ground_truth, folder.class_names)
  return dataset, truth
