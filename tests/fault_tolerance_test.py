"""Nothing is lost: bin/train killed with SIGKILL mid-epoch resumes from its last backup, and in
deterministic mode ends with exactly the labels and weights of an uninterrupted run (the default
backbone, whose dropout's seed-generator state the backup carries)."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_npz(make_npz):
  return make_npz(96, 20, 3)


def _command(dataset, run_dir):
  return [sys.executable, os.path.join(ROOT, "bin", "train"), f"--dataset={dataset}",
          f"--run_dir={run_dir}", "--architecture=alexnet_small", "--heads=4,3", "--lam=10", "--epochs=4",
          "--batch_size=16", "--nopts=3", "--deterministic", "--seed=3", "--strategy=default",
          "--noevaluate"]


def _env():
  return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def _weights(path):
  arrays = []
  with h5py.File(path, "r") as f:
    f.visititems(lambda name, obj: arrays.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
  return dict(arrays)


def _backup_epoch(run_dir):
  path = os.path.join(run_dir, "backup", "training_metadata.json")
  try:
    with open(path) as f:
      return json.load(f)["epoch"]
  except (OSError, ValueError):
    return 0


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tiny_npz, tmp_path):
  # The uninterrupted run goes beside the one that is killed (deterministic mode: sharing the CPU changes
  # its timing, not its numbers).
  straight = tmp_path / "straight"
  log = open(tmp_path / "straight.log", "w+")  # pylint: disable=consider-using-with
  uninterrupted = subprocess.Popen(_command(tiny_npz, straight), stdout=subprocess.DEVNULL, stderr=log,
                                   env=_env())

  killed = tmp_path / "killed"
  process = subprocess.Popen(_command(tiny_npz, killed), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=_env())
  deadline = time.time() + 600
  while _backup_epoch(killed) < 2 and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert process.poll() is None, "the run ended before it could be killed"
  time.sleep(0.5)  # into epoch 3 (of 4): mid-epoch
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert _backup_epoch(killed) >= 2
  assert not os.path.exists(killed / "metrics.json")

  resumed = subprocess.run(_command(tiny_npz, killed), capture_output=True, text=True, timeout=600,
                           env=_env())
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  with open(killed / "metrics.json") as f:
    assert json.load(f)["resumed_from_epoch"] >= 2

  uninterrupted.wait(timeout=600)
  log.seek(0)
  assert uninterrupted.returncode == 0, log.read()[-3000:]
  log.close()
  labels_straight = np.load(straight / "labels.npz")["labels"]
  labels_killed = np.load(killed / "labels.npz")["labels"]
  np.testing.assert_array_equal(labels_killed, labels_straight)
  weights_straight = _weights(straight / "final.weights.h5")
  weights_killed = _weights(killed / "final.weights.h5")
  assert weights_straight.keys() == weights_killed.keys() and weights_straight
  for name, value in weights_straight.items():
    np.testing.assert_array_equal(weights_killed[name], value, err_msg=name)
