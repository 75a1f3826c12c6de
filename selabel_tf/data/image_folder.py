"""Image folders: every image under a directory, decoded to uint8 [N, S, S, C] with a stable index.

Layouts (`load_image_folder(path, ...)`):

1. Flat: `path/*.png`. Unlabelled: `ground_truth` is None and `class_names` is ().
2. Class subfolders: `path/<class>/**/*.png`. The class of a file is its first folder below `path`;
   class ids follow the sorted class names. A folder with image files both directly in it and in
   subfolders is ambiguous and rejected.
3. Split subfolders: `path/train/...`, `path/test/...` (also `val`, `validation`), each laid out as 1 or 2.
   `split="train"` loads `path/train` (any existing subfolder named by `split` works, e.g. "unlabelled").
   Class names are the union over the split subfolders, so a class id means the same class in every
   split even when a split lacks a class.

Holdout split. When `split` is given and `path` has no split subfolders at all, `holdout_fraction` carves
the splits out of `path` itself: a random subset of round(holdout_fraction * M) of the M image files is
"test" (or "val"), the rest "train". The subset is `np.random.default_rng(seed).permutation(M)[:count]`
over the sorted file list, taken before decoding: the same files and seed give the same split, the two
parts are disjoint and together hold every file, and skipping bad files never moves a file to the other
part (adding or removing files does reshuffle it). If `path` has split subfolders but not the requested
one, that is an error, not a holdout: holding out from a folder that already has splits mixes them.

Stable index. Example i is the i-th entry of the sorted (Python string order) list of the kept files'
relative POSIX paths, relative to the loaded folder (`path` or `path/<split>`); `FolderImages.files[i]`
names it. Shuffling and sharding happen downstream on these indices.

Files. Extensions IMAGE_EXTENSIONS, case-insensitive, found recursively (symlinked folders followed once);
names starting with "." (`.DS_Store`, `._x.jpg` AppleDouble files, `.ipynb_checkpoints/`) and files with
other extensions (README.txt) are ignored silently. PIL identifies the format from the bytes, not from the
extension.

Decoding (`decode_image`), in a thread pool (PIL releases the GIL while decoding and resizing):

* The whole file is decoded (`Image.load()`), so a truncated file fails; `ImageFile.LOAD_TRUNCATED_IMAGES`
  is left as it is (False unless other code changed it, which is warned about). The first frame of an
  animated GIF/WebP is used; EXIF orientation is not applied (as in tf.io.decode_jpeg and torchvision).
* Converted to C channels: channels=3 gives RGB (grayscale replicated, palette colours looked up, CMYK/
  YCbCr converted); channels=1 gives grayscale (ITU-R 601-2 luma for colour). Alpha is dropped, not
  composited: each pixel keeps its stored colour, as PIL's convert("RGB"), tf.io.decode_png(channels=3)
  and torchvision's loader do (an opaque pixel is unchanged; a fully transparent one shows whatever colour
  it stores). 16-bit grayscale (I;16) is scaled to 8 bits (v / 257), not clipped as PIL's convert("L").
* Resized so the shorter side is S (bilinear, antialiased when shrinking, longer side rounded to the
  nearest pixel), then centre-cropped to S x S (the crop's offset is floor((side - S) / 2)).

Image size. `image_size=None` takes the images' own: when every image file has the same size W x H
(read from the file headers, a quick pass before decoding), S is min(W, H) (the side itself for square
images); else `ImageSizeError` lists the sizes found and asks for an `image_size`.

Bad files (`on_bad`): a file with an image extension that PIL cannot open or fully decode (truncated,
corrupt, a text file named x.png). "error" (default) raises `BadImageError` (a ValueError) naming the
first such file in index order and PIL's reason; "skip" leaves it out, lists it in `FolderImages.skipped`,
and logs one warning naming every skipped file.
"""

import concurrent.futures
import dataclasses
import logging
import math
import os
import pathlib
import time
from typing import Optional, Union

import numpy as np
from PIL import Image
from PIL import ImageFile

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
SPLIT_NAMES = ("train", "val", "validation", "test")
HELD_OUT_SPLITS = ("test", "val", "validation")  # with holdout_fraction; "train" is the rest
ON_BAD_MODES = ("error", "skip")
_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_MAX_FILES_PER_TASK = 64
_PROGRESS_EVERY = 20_000


class BadImageError(ValueError):
  """An image file that cannot be decoded, with on_bad="error"; `path` and `reason` name it."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"cannot decode image file {path!r}: {reason}. Fix or remove it, or pass "
                     f"on_bad='skip' to leave undecodable files out")
    self.path, self.reason = path, reason


class ImageSizeError(ValueError):
  """image_size=None, and the images do not share one size; `sizes` maps (W, H) to its file count."""

  def __init__(self, root: str, sizes: dict):
    listed = ", ".join(f"{w}x{h} ({count} files)" for (w, h), count in
                       sorted(sizes.items(), key=lambda item: -item[1])[:5])
    more = f" and {len(sizes) - 5} more sizes" if len(sizes) > 5 else ""
    super().__init__(f"image folder {root!r}: the images have {len(sizes)} different sizes ({listed}{more}); "
                     f"give image_size, the side every image is resized and centre-cropped to")
    self.root, self.sizes = root, dict(sizes)


@dataclasses.dataclass(frozen=True)
class FolderImages:
  """The decoded images of a folder, indexed 0..N-1 by sorted relative path.

  Attributes:
    images: uint8 [N, S, S, C], decoded, converted to C channels, resized and centre-cropped.
    ground_truth: int64 [N], class ids (positions in `class_names`) from the class subfolders, or None
      for a flat (unlabelled) folder.
    class_names: tuple of str, the sorted class subfolder names; () when unlabelled.
    files: tuple of N str, relative POSIX paths (relative to the loaded folder); files[i] is example i.
    skipped: tuple of (relative path, reason) for the files left out with on_bad="skip".
  """
  images: np.ndarray
  ground_truth: Optional[np.ndarray]
  class_names: tuple
  files: tuple
  skipped: tuple


def load_image_folder(path: Union[str, os.PathLike],
                      *,
                      image_size: Optional[int] = None,
                      channels: int = 3,
                      split: Optional[str] = None,
                      holdout_fraction: Optional[float] = None,
                      seed: int = 0,
                      on_bad: str = "error",
                      num_threads: Optional[int] = None) -> FolderImages:
  """Loads every image under `path` (see the module docstring for layouts, order and decoding).

  Args:
    path: the folder.
    image_size: S, the side of the square images returned (> 0); None: the images' own, when they
      share one size (see the module docstring).
    channels: C, 1 (grayscale) or 3 (RGB).
    split: None for a folder without split subfolders; else the split subfolder to load, or, when
      `path` has no split subfolders, "train" or "test"/"val" of the holdout split.
    holdout_fraction: in (0, 1): the fraction of files held out as "test" when `path` has no split
      subfolders. Needs `split`.
    seed: seed of the holdout split.
    on_bad: "error" or "skip": what to do with an image file that cannot be decoded.
    num_threads: decoding threads; default the number of CPUs this process may use.

  Returns:
    A `FolderImages`.

  Raises:
    FileNotFoundError: `path` (or nothing at it) does not exist.
    NotADirectoryError: `path` is a file.
    ValueError: a bad option; a folder without image files; an ambiguous layout; a split that is
      neither a subfolder nor a holdout part; every file bad.
    BadImageError: an undecodable file with on_bad="error".
    ImageSizeError: image_size=None and images of different sizes.
  """
  path = os.fspath(path)
  _check_options(image_size, channels, split, holdout_fraction, on_bad, num_threads)
  if not os.path.exists(path):
    raise FileNotFoundError(f"image folder {path!r} does not exist")
  if not os.path.isdir(path):
    raise NotADirectoryError(f"image folder {path!r} is a file, not a directory")

  root, files, holdout_test = _select_files(path, split, holdout_fraction, seed)
  labelled = _is_labelled(root, files)
  class_names = ()
  if labelled:
    names = {f.split("/", 1)[0] for f in files}
    if root != path:  # split subfolders: the same class ids in every split
      for sibling in _split_dirs(path):
        if sibling == split:
          continue
        sibling_files = _image_files(os.path.join(path, sibling))
        if sibling_files and _is_labelled(os.path.join(path, sibling), sibling_files, strict=False):
          names.update(f.split("/", 1)[0] for f in sibling_files if "/" in f)
    class_names = tuple(sorted(names))
  if holdout_test is not None:
    keep = np.isin(np.arange(len(files)), holdout_test) == (split in HELD_OUT_SPLITS)
    files = [f for f, k in zip(files, keep) if k]
    if not files:
      raise ValueError(f"image folder {path!r}: holdout_fraction={holdout_fraction} leaves the "
                       f"{split!r} part empty; choose a fraction that leaves files in both parts")

  if image_size is None:
    image_size = common_image_size(root, files, num_threads)
  images, bad = _decode_all(root, files, image_size, channels, on_bad, num_threads)
  if bad:
    bad_set = {index for index, _ in bad}
    kept = [i for i in range(len(files)) if i not in bad_set]
    if not kept:
      raise ValueError(f"image folder {root!r}: none of its {len(files)} image files could be decoded, "
                       f"e.g. {files[bad[0][0]]}: {bad[0][1]}")
    skipped = tuple((files[index], reason) for index, reason in bad)
    images = images[kept]
    files = [files[i] for i in kept]
    logger.warning("Skipped %d of %d image files under %s that could not be decoded (on_bad='skip'):\n%s",
                   len(skipped), len(files) + len(skipped), root,
                   "\n".join(f"  {name}: {reason}" for name, reason in skipped))
  else:
    skipped = ()
  ground_truth = None
  if labelled:
    class_ids = {name: i for i, name in enumerate(class_names)}
    ground_truth = np.array([class_ids[f.split("/", 1)[0]] for f in files], np.int64)
  return FolderImages(images=images, ground_truth=ground_truth, class_names=class_names,
                      files=tuple(files), skipped=skipped)


def common_image_size(root: str, files, num_threads: Optional[int] = None) -> int:
  """min(W, H) of the one size W x H that every image file under `root` has (headers only; files PIL
  cannot open are left to the decoding pass).

  Raises:
    ImageSizeError: the files have more than one size (or none could be opened).
  """
  def size_of(name):
    try:
      with Image.open(os.path.join(root, name)) as image:
        return image.size
    except Exception:  # pylint: disable=broad-except
      return None  # reported, or skipped, by the decoding pass

  with concurrent.futures.ThreadPoolExecutor(max_workers=_threads(num_threads)) as executor:
    found = [size for size in executor.map(size_of, files, chunksize=256) if size is not None]
  sizes = {}
  for size in found:
    sizes[size] = sizes.get(size, 0) + 1
  if len(sizes) != 1:
    raise ImageSizeError(root, sizes)
  (width, height), = sizes
  logger.info("Image folder %s: every image is %dx%d; image_size %d%s", root, width, height,
              min(width, height), "" if width == height else " (centre-cropped to a square)")
  return min(width, height)


def _threads(num_threads):
  if num_threads is None:
    num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return num_threads or 1


def decode_image(file_path: Union[str, os.PathLike], *, image_size: int, channels: int = 3) -> np.ndarray:
  """Decodes one image file as `load_image_folder` does.

  Args:
    file_path: the image file.
    image_size: S.
    channels: C, 1 or 3.

  Returns:
    uint8 [S, S, C].

  Raises:
    OSError: the file cannot be opened, identified (PIL.UnidentifiedImageError) or fully decoded
      (truncated). PIL raises other types too (SyntaxError, ValueError, ...) for some corrupt data.
  """
  with Image.open(file_path) as image:
    image.load()  # decodes everything now: a truncated file raises here, not later
    # All inside the `with`: closing the file also frees an image that conversion returned as is.
    image = _resize_and_centre_crop(_to_channels(image, channels), image_size)
    array = np.asarray(image, np.uint8)
  return array.reshape(image_size, image_size, channels)


def _to_channels(image, channels):
  """`image` as mode "L" (channels=1) or "RGB" (channels=3), alpha dropped."""
  if image.mode in _SIXTEEN_BIT_GRAY:
    # PIL's convert("L") clips 16-bit values at 255; scale them instead.
    values = np.asarray(image, np.float64)
    image = Image.fromarray(np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8), "L")
  elif image.mode in ("P", "PA"):
    # Via RGBA: converting a palette image with per-entry transparency straight to RGB warns.
    image = image.convert("RGBA")
  target = "L" if channels == 1 else "RGB"
  if image.mode == target:
    return image
  if channels == 1 and image.mode not in ("1", "L", "LA", "RGB", "RGBA"):
    image = image.convert("RGB")  # CMYK, YCbCr, ...: no direct conversion to L in every PIL
  return image.convert(target)


def _resize_and_centre_crop(image, size):
  """Shorter side to `size` (bilinear), then the central size x size square."""
  width, height = image.size
  scale = size / min(width, height)
  new_width = size if width <= height else max(size, round(width * scale))
  new_height = size if height < width else max(size, round(height * scale))
  image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
  left, top = (new_width - size) // 2, (new_height - size) // 2
  if (new_width, new_height) != (size, size):
    image = image.crop((left, top, left + size, top + size))
  return image


def _check_options(image_size, channels, split, holdout_fraction, on_bad, num_threads):
  if image_size is not None and not (isinstance(image_size, (int, np.integer))
                                     and not isinstance(image_size, bool) and image_size > 0):
    raise ValueError(f"image_size must be None (the images' own) or an integer > 0 (the side of the "
                     f"square images), got {image_size!r}")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
  if on_bad not in ON_BAD_MODES:
    raise ValueError(f"on_bad must be one of {ON_BAD_MODES}, got {on_bad!r}")
  if num_threads is not None and not (isinstance(num_threads, (int, np.integer)) and num_threads >= 1):
    raise ValueError(f"num_threads must be None or an integer >= 1, got {num_threads!r}")
  if holdout_fraction is not None:
    if not (isinstance(holdout_fraction, (int, float, np.floating)) and 0 < holdout_fraction < 1):
      raise ValueError(f"holdout_fraction must be None or in (0, 1), got {holdout_fraction!r}")
    if split is None:
      raise ValueError(f"holdout_fraction={holdout_fraction} needs split='train' or one of "
                       f"{HELD_OUT_SPLITS}, got split=None")


def _select_files(path, split, holdout_fraction, seed):
  """The folder to load, its sorted image files, and the holdout's "test" indices (or None)."""
  split_dirs = _split_dirs(path)
  if split is None:
    if split_dirs:
      raise ValueError(f"image folder {path!r} has split subfolders {split_dirs}; pass split= one of "
                       f"them")
    return path, _nonempty_files(path), None
  if os.path.isdir(os.path.join(path, split)):
    if holdout_fraction is not None:
      logger.info("Image folder %s: loading its subfolder %r; holdout_fraction is not used", path, split)
    root = os.path.join(path, split)
    return root, _nonempty_files(root), None
  if split_dirs:
    raise ValueError(f"image folder {path!r} has no subfolder {split!r}; its split subfolders are "
                     f"{split_dirs}")
  if holdout_fraction is None:
    subfolders = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    raise ValueError(f"image folder {path!r} has no subfolder for split={split!r} (subfolders found: "
                     f"{subfolders or 'none'}); pass holdout_fraction to hold out a random fraction of "
                     f"its files as 'test', or split=None to load all of them")
  if split != "train" and split not in HELD_OUT_SPLITS:
    raise ValueError(f"image folder {path!r}: with holdout_fraction, split must be 'train' or one of "
                     f"{HELD_OUT_SPLITS}, got {split!r}")
  files = _nonempty_files(path)
  count = int(round(holdout_fraction * len(files)))
  held_out = np.sort(np.random.default_rng(seed).permutation(len(files))[:count])
  logger.info("Image folder %s: %d of %d files held out (holdout_fraction=%g, seed=%d); "
              "loading %r", path, count, len(files), holdout_fraction, seed, split)
  return path, files, held_out


def _split_dirs(path):
  return [name for name in SPLIT_NAMES if os.path.isdir(os.path.join(path, name))]


def _nonempty_files(root):
  files = _image_files(root)
  if not files:
    raise ValueError(f"image folder {root!r} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)}"
                     f", case-insensitive, in it and its subfolders)")
  return files


def _image_files(root):
  """Sorted relative POSIX paths of the files under `root` with an image extension, hidden ones skipped."""
  found, seen = [], set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # a symlink loop, or a folder linked twice: read it once
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    relative = pathlib.PurePath(os.path.relpath(dirpath, root))
    for name in filenames:
      if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        found.append((relative / name).as_posix())
  return sorted(found)


def _is_labelled(root, files, strict=True):
  """Whether `files` lie in class subfolders (True) or directly in `root` (False)."""
  top = [f for f in files if "/" not in f]
  if not top:
    return True
  if strict and len(top) < len(files):
    nested = next(f for f in files if "/" in f)
    raise ValueError(f"image folder {root!r} mixes images directly in it ({top[0]!r}, ...) with images in "
                     f"subfolders ({nested!r}, ...); expected either a flat folder (unlabelled) or one "
                     f"subfolder per class")
  return False


def _decode_all(root, files, image_size, channels, on_bad, num_threads):
  """Decodes `files` in a thread pool, in order.

  Returns:
    (uint8 [len(files), S, S, C] with undecodable rows left unset, [(index, reason)] of those rows).

  Raises:
    ValueError: with on_bad="error", for the first undecodable file in index order.
  """
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code): truncated images "
                   "under %s load padded instead of being reported as bad", root)
  num_files = len(files)
  images = np.empty((num_files, image_size, image_size, channels), np.uint8)
  num_threads = _threads(num_threads)
  # Contiguous runs of files per task: few futures even for millions of files, balanced over threads.
  per_task = max(1, min(_MAX_FILES_PER_TASK, math.ceil(num_files / (4 * num_threads))))

  def decode_run(start):
    bad = []
    for index in range(start, min(start + per_task, num_files)):
      try:
        images[index] = decode_image(os.path.join(root, files[index]), image_size=image_size,
                                     channels=channels)
      except MemoryError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        # PIL raises many types for corrupt data (OSError, SyntaxError, struct.error, ...).
        bad.append((index, f"{type(error).__name__}: {error}"))
    return bad

  logger.info("Decoding %d images under %s to %dx%dx%d with %d threads", num_files, root, image_size,
              image_size, channels, num_threads)
  start_time, next_report, bad = time.monotonic(), _PROGRESS_EVERY, []
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=num_threads)
  try:
    for start, run_bad in zip(range(0, num_files, per_task),
                              executor.map(decode_run, range(0, num_files, per_task))):
      if run_bad and on_bad == "error":
        index, reason = run_bad[0]
        raise BadImageError(os.path.join(root, files[index]), reason)
      bad.extend(run_bad)
      if start + per_task >= next_report:
        logger.info("Decoded %d of %d images (%.0f s)", min(start + per_task, num_files), num_files,
                    time.monotonic() - start_time)
        next_report += _PROGRESS_EVERY
  finally:
    executor.shutdown(wait=True, cancel_futures=True)
  logger.info("Decoded %d images under %s in %.1f s", num_files, root, time.monotonic() - start_time)
  return images, bad
