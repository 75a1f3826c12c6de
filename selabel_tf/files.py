"""Writes that a reader never sees half done, on any filesystem `tf.io.gfile` knows (local, gs://, ram://).

`write_atomically(path, write)`: one file. `write(local_path)` writes it into a local temporary file
(Keras, numpy and h5py need a local path); it is then copied beside `path` under a temporary name and
renamed over `path`. On a local disk the rename is atomic.

`replace_directory(path, write)`: a directory (a SavedModel export). `write(temporary_directory)`
writes it beside `path`; the old `path`, if any, is moved aside, the new one moved in, the old one
deleted. A local directory moves by one rename. Filesystems without a directory rename (object stores,
ram://) move file by file, the SavedModel's `saved_model.pb` last: a partly moved export has no
`saved_model.pb` and does not load, so it is never read as a complete one.
"""

import os
import tempfile
import uuid
from typing import Callable

import tensorflow as tf

gfile = tf.io.gfile

# Moved last, so that a directory without them is visibly incomplete (TF loads a SavedModel from these).
_LAST = ("fingerprint.pb", "saved_model.pb")


def is_local(path: str) -> bool:
  """Whether `path` is on the local disk (no scheme://)."""
  return "://" not in str(path)


def write_atomically(path: str, write: Callable[[str], object]):
  """Calls `write(temporary_local_path)`, then puts that file at `path` in one rename."""
  path = str(path)
  directory = os.path.dirname(os.path.abspath(path)) if is_local(path) else path.rsplit("/", 1)[0]
  gfile.makedirs(directory)
  name = os.path.basename(path)
  suffix = name[name.index("."):] if "." in name else ".tmp"  # keeps ".weights.h5", which Keras requires
  if is_local(path):
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
      write(tmp)
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a run's files from other users
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return
  with tempfile.TemporaryDirectory(prefix="selabel-") as local:
    local_path = os.path.join(local, "file" + suffix)
    write(local_path)
    remote_tmp = f"{directory}/.tmp-{uuid.uuid4().hex}{suffix}"
    try:
      with open(local_path, "rb") as source, gfile.GFile(remote_tmp, "wb") as target:
        while chunk := source.read(1 << 24):
          target.write(chunk)
      gfile.rename(remote_tmp, path, overwrite=True)
    finally:
      if gfile.exists(remote_tmp):
        gfile.remove(remote_tmp)


def write_text(path: str, text: str):
  """`write_atomically` of a text file."""
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  write_atomically(path, write)


def read_text(path: str) -> str:
  with gfile.GFile(str(path), "r") as f:
    return f.read()


def replace_directory(path: str, write: Callable[[str], object]):
  """Calls `write(temporary_directory)` (beside `path`, not yet existing), then puts it at `path`,
  replacing what was there (see the module docstring). A failing `write` leaves `path` as it was."""
  path = str(path).rstrip("/")
  parent = os.path.dirname(os.path.abspath(path)) if is_local(path) else path.rsplit("/", 1)[0]
  gfile.makedirs(parent)
  token = uuid.uuid4().hex[:12]
  base = os.path.basename(path)
  tmp = f"{parent}/.{base}.tmp-{token}"
  old = f"{parent}/.{base}.old-{token}"
  try:
    write(tmp)
    if gfile.exists(path):
      _move_directory(path, old)
    _move_directory(tmp, path)
  finally:
    for leftover in (tmp, old):
      _remove_tree(leftover)


def _move_directory(source: str, target: str):
  if is_local(source):
    os.rename(source, target)
    return
  walked = [(root.rstrip("/"), names) for root, _, names in gfile.walk(source)]
  directories = {root for root, _ in walked}
  # ram:// lists a directory "d.x" beside "d" also as a file ".x" in "d": not a file, not moved.
  files = [f"{root}/{name}" for root, names in walked for name in names if root + name not in directories]
  files.sort(key=lambda f: os.path.basename(f) in _LAST)
  for file in files:
    destination = target + file[len(source):]
    gfile.makedirs(destination.rsplit("/", 1)[0])
    gfile.rename(file, destination, overwrite=True)
  _remove_tree(source)


def _remove_tree(path: str):
  if gfile.exists(path):
    try:
      gfile.rmtree(path)
    except tf.errors.NotFoundError:  # ram:// once only empty directories remain
      pass

