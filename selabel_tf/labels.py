"""Self-labels as files: a run's `labels.npz` and `labels.csv`, written and read back.

`labels.csv` has a header `index,source_index,head_0,...,head_{T-1}` and one row per example: its index
in [0, N), its position in the source before any subsetting (`Dataset.original_index`), and its cluster
in each head. `load(path)` reads either file as int32 [T, N].
"""

import io

import numpy as np
import tensorflow as tf

from selabel_tf import files


def to_csv(labels: np.ndarray, source_index: np.ndarray) -> str:
  """The CSV text of labels int [T, N] with each example's source index int [N]."""
  labels = np.asarray(labels)
  num_heads, num_examples = labels.shape
  table = np.column_stack([np.arange(num_examples), np.asarray(source_index), labels.T]).astype(np.int64)
  header = ",".join(["index", "source_index"] + [f"head_{t}" for t in range(num_heads)])
  out = io.StringIO()
  np.savetxt(out, table, fmt="%d", delimiter=",", header=header, comments="")
  return out.getvalue()


def write(directory: str, labels: np.ndarray, source_index: np.ndarray, epoch: int):
  """labels.npz and labels.csv in `directory`, each atomically."""
  files.write_atomically(f"{directory}/labels.npz",
                         lambda tmp: np.savez(tmp, labels=labels, source_index=source_index, epoch=epoch))
  files.write_text(f"{directory}/labels.csv", to_csv(labels, source_index))


def load(path: str) -> np.ndarray:
  """Labels int32 [T, N] from a labels.npz or labels.csv.

  Raises:
    ValueError: a file that is neither, or a CSV whose rows are not indices 0..N-1 in order, naming it.
  """
  path = str(path)
  if path.endswith(".npz"):
    with tf.io.gfile.GFile(path, "rb") as f:
      return np.load(io.BytesIO(f.read()))["labels"].astype(np.int32)
  if not path.endswith(".csv"):
    raise ValueError(f"{path}: labels must be a .npz or .csv file")
  text = files.read_text(path)
  header = text.splitlines()[0].split(",") if text else []
  if header[:2] != ["index", "source_index"] or not all(h.startswith("head_") for h in header[2:]):
    raise ValueError(f"{path}: header must be index,source_index,head_0,..., got {','.join(header)}")
  table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
  if not np.array_equal(table[:, 0], np.arange(len(table))):
    raise ValueError(f"{path}: the index column must be 0..{len(table) - 1} in order")
  return table[:, 2:].T.astype(np.int32)
