"""Self-labels as files: a run's `labels.npz` and `labels.csv`, written and read back.

`labels.csv` has one row per example: its index in [0, N), its id in the source, and its cluster in each
head. The source id is the example's file path for an image folder (column `path`, relative to the
folder; quoted as CSV quotes), else its position in the source before any subsetting (column
`source_index`, `Dataset.original_index`): header `index,path,head_0,...` or `index,source_index,head_0,
...`. `labels.npz` holds the same as arrays `labels` int32 [T, N], `source_ids` (str or int64 [N]) and
`epoch`. `read(path)` reads either file back as a `LabelFile`; `load(path)` returns just the labels.
"""

import csv
import dataclasses
import io

import numpy as np
import tensorflow as tf

from selabel_tf import files

SOURCE_COLUMNS = ("source_index", "path")


@dataclasses.dataclass(frozen=True)
class LabelFile:
  """Labels read back from a labels file.

  Attributes:
    labels: int32 [T, N], example i's cluster in head t at [t, i].
    source_ids: [N], each example's file path (str; image folders) or source index (int64).
  """
  labels: np.ndarray
  source_ids: np.ndarray

  @property
  def num_heads(self) -> int:
    return int(self.labels.shape[0])

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[1])


def _is_paths(source_ids) -> bool:
  return np.asarray(source_ids).dtype.kind in "US"


def to_csv(labels: np.ndarray, source_ids: np.ndarray) -> str:
  """The CSV text of labels int [T, N] with each example's source id [N] (file paths or indices)."""
  labels = np.asarray(labels)
  num_heads, num_examples = labels.shape
  source_ids = np.asarray(source_ids)
  if source_ids.shape != (num_examples,):
    raise ValueError(f"source_ids must have shape ({num_examples},), got {source_ids.shape}")
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["index", SOURCE_COLUMNS[_is_paths(source_ids)]] + [f"head_{t}" for t in range(num_heads)])
  ids = source_ids.tolist()
  columns = labels.T.tolist()
  writer.writerows([i, ids[i], *columns[i]] for i in range(num_examples))
  return out.getvalue()


def write(directory: str, labels: np.ndarray, source_ids: np.ndarray, epoch: int):
  """labels.npz and labels.csv in `directory`, each atomically."""
  source_ids = np.asarray(source_ids)
  files.write_atomically(f"{directory}/labels.npz",
                         lambda tmp: np.savez(tmp, labels=np.asarray(labels, np.int32), source_ids=source_ids,
                                              epoch=epoch))
  files.write_text(f"{directory}/labels.csv", to_csv(labels, source_ids))


def read(path: str) -> LabelFile:
  """The labels and source ids of a labels.npz or labels.csv (a local or gfile path).

  Raises:
    ValueError: a file that is neither, or whose content is not as written by `write`, naming it.
  """
  path = str(path)
  if path.endswith(".npz"):
    with tf.io.gfile.GFile(path, "rb") as f:
      with np.load(io.BytesIO(f.read())) as arrays:
        if "labels" not in arrays:
          raise ValueError(f"{path}: no array 'labels' (has {sorted(arrays)})")
        labels = arrays["labels"]
        # Files of earlier versions call the ids source_index.
        ids = arrays["source_ids"] if "source_ids" in arrays else arrays.get("source_index")
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{path}: 'labels' must be integers [T, N], got {labels.dtype} {labels.shape}")
    if ids is None:
      ids = np.arange(labels.shape[1], dtype=np.int64)
    return LabelFile(labels.astype(np.int32), np.asarray(ids))
  if not path.endswith(".csv"):
    raise ValueError(f"{path}: labels must be a .npz or .csv file")
  rows = list(csv.reader(io.StringIO(files.read_text(path))))
  header = rows[0] if rows else []
  if (len(header) < 3 or header[0] != "index" or header[1] not in SOURCE_COLUMNS
      or header[2:] != [f"head_{t}" for t in range(len(header) - 2)]):
    raise ValueError(f"{path}: header must be index,source_index (or path),head_0,...,head_T-1, got "
                     f"{','.join(header)}")
  body = rows[1:]
  if any(len(row) != len(header) for row in body):
    line = next(i for i, row in enumerate(body) if len(row) != len(header)) + 2
    raise ValueError(f"{path}: line {line} does not have the header's {len(header)} columns")
  try:
    index = np.array([int(row[0]) for row in body], np.int64)
    labels = np.array([[int(v) for v in row[2:]] for row in body], np.int64).reshape(len(body), -1).T
    ids = (np.array([row[1] for row in body]) if header[1] == "path"
           else np.array([int(row[1]) for row in body], np.int64))
  except ValueError as e:
    raise ValueError(f"{path}: a value that is not an integer ({e})") from None
  if not np.array_equal(index, np.arange(len(body))):
    raise ValueError(f"{path}: the index column must be 0..{len(body) - 1} in order")
  return LabelFile(labels.astype(np.int32), ids)


def load(path: str) -> np.ndarray:
  """Labels int32 [T, N] from a labels.npz or labels.csv (see `read`)."""
  return read(path).labels
