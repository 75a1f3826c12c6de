"""Contact sheets: a cluster's most confident images as one grid, and an overview with a row per cluster.

`bin/label` writes them as PNG files; `SelfLabelCallback` logs a few to TensorBoard at each labelling.
Images are uint8 [N, H, W, C] (C = 1 or 3) in example order; a sheet is uint8 [height, width, 3].
"""

import io
from typing import Optional, Sequence

import numpy as np

_PAD = 2
_BACKGROUND = 255
_CAPTION_HEIGHT = 14
_CAPTION_WIDTH = 150


def most_confident(labels: np.ndarray, confidence: np.ndarray, cluster: int, count: int) -> np.ndarray:
  """Indices of up to `count` members of `cluster`, most confident first (ties: lower index first)."""
  members = np.flatnonzero(np.asarray(labels) == cluster)
  order = np.lexsort((members, -np.asarray(confidence, np.float64)[members]))
  return members[order[:count]]


def _rgb(images):
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be uint8 [N, H, W, 1 or 3], got {images.dtype} {images.shape}")
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def grid(images: np.ndarray, columns: int, rows: Optional[int] = None) -> np.ndarray:
  """`images` [n, H, W, C] tiled row by row, `columns` per row (rows: enough for all, or fixed, blank
  cells left white), with a white border of 2 px around each cell."""
  images = _rgb(images)
  count, height, width, _ = images.shape
  rows = rows if rows is not None else max(1, -(-count // columns))
  sheet = np.full((rows * (height + _PAD) + _PAD, columns * (width + _PAD) + _PAD, 3), _BACKGROUND, np.uint8)
  for i in range(min(count, rows * columns)):
    top, left = _PAD + (i // columns) * (height + _PAD), _PAD + (i % columns) * (width + _PAD)
    sheet[top:top + height, left:left + width] = images[i]
  return sheet


def _upscale(images, min_side):
  """Nearest-neighbour upscaling of small images (28 px digits) so that a sheet is readable."""
  factor = max(1, -(-min_side // max(1, min(images.shape[1:3]))))
  return images if factor == 1 else images.repeat(factor, axis=1).repeat(factor, axis=2)


def cluster_sheet(images: np.ndarray, labels: np.ndarray, confidence: np.ndarray, cluster: int, *,
                  count: int = 64, columns: int = 8, min_side: int = 48) -> np.ndarray:
  """The grid of `cluster`'s `count` most confident images (of all its members when fewer)."""
  members = most_confident(labels, confidence, cluster, count)
  images = np.asarray(images)
  if members.size == 0:
    return grid(_upscale(images[:0], min_side), columns, rows=1)
  return grid(_upscale(_rgb(images[members]), min_side), columns)


def overview(images: np.ndarray, labels: np.ndarray, confidence: np.ndarray, num_clusters: int, *,
             per_row: int = 12, min_side: int = 32, clusters: Optional[Sequence[int]] = None) -> np.ndarray:
  """One row per cluster (of `clusters`, default all): a caption "cluster k (n)" and its `per_row` most
  confident images."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  labels = np.asarray(labels)
  sizes = np.bincount(labels, minlength=num_clusters)
  rows = []
  for k in (range(num_clusters) if clusters is None else clusters):
    members = most_confident(labels, confidence, k, per_row)
    row = grid(_upscale(_rgb(np.asarray(images)[members] if members.size else np.asarray(images)[:0]),
                        min_side), per_row, rows=1)
    caption = Image.new("RGB", (_CAPTION_WIDTH, row.shape[0]), (_BACKGROUND,) * 3)
    ImageDraw.Draw(caption).text((4, max(0, row.shape[0] // 2 - _CAPTION_HEIGHT // 2)),
                                 f"cluster {k} ({sizes[k]})", fill=(0, 0, 0))
    rows.append(np.concatenate([np.asarray(caption), row], axis=1))
  return np.concatenate(rows, axis=0)


def png_bytes(sheet: np.ndarray) -> bytes:
  """The PNG encoding of a sheet uint8 [h, w, 3]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  Image.fromarray(np.asarray(sheet, np.uint8)).save(out, format="PNG")
  return out.getvalue()
