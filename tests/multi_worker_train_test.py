"""bin/train under MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 (TF_CONFIG).

One set of processes, started together: an uninterrupted pair of workers, a one-process run on two
replicas (the same global batches split the same way), and a second pair whose worker 1 is killed with
SIGKILL mid-epoch; that pair is then restarted with the same commands and resumes from the chief's
backup. The labelling of a 2-worker run is sharded (each worker keeps its half of the label pass).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import workers  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# lambda 1 solved to 1e-6 and a small learning rate, as the 1-vs-2-replica test (distribute_test): the
# labels then depend on the networks' predictions, not on where two unconverged solves stopped.
ARGS = ["--architecture=alexnet_small", "--heads=4,3", "--lam=1", "--labeller_tol=1e-6",
        "--labeller_max_iters=20000", "--learning_rate=0.01", "--epochs=3", "--nopts=3", "--batch_size=16",
        "--deterministic", "--seed=3", "--noevaluate"]


def _env(**extra):
  return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _start(dataset, run_dir, log_path, ports=None, index=0):
  command = [sys.executable, os.path.join(ROOT, "bin", "train"), f"--dataset={dataset}",
             f"--run_dir={run_dir}", *ARGS]
  if ports is None:
    command += ["--strategy=mirrored", "--cpu_devices=2"]
    env = _env()
  else:
    command += ["--strategy=multi_worker"]
    env = _env(TF_CONFIG=workers.tf_config(ports, index))
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log_path


def _wait(process, timeout=600):
  process, log_path = process
  process.wait(timeout=timeout)
  with open(log_path) as f:
    output = f.read()
  return process.returncode, output


def _final_state(output):
  """(labels_sha256, weights_sha256) from a worker's 'run finished' log line."""
  metrics = json.loads(re.search(r"run finished: (\{.*\})", output).group(1))
  return metrics["labels_sha256"], metrics["weights_sha256"]


def _backup_epoch(run_dir):
  try:
    with open(os.path.join(run_dir, "backup", "training_metadata.json")) as f:
      return json.load(f)["epoch"]
  except (OSError, ValueError):
    return 0


def _weights(path):
  arrays = []
  with h5py.File(path, "r") as f:
    f.visititems(lambda name, obj: arrays.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
  return dict(arrays)


@pytest.fixture(scope="module")
def runs(make_npz, tmp_path_factory):
  dataset = make_npz(96, 20, 3)
  root = tmp_path_factory.mktemp("multi_worker")
  straight_ports, killed_ports = workers.free_ports(2), workers.free_ports(2)
  straight = [_start(dataset, root / "straight", root / f"straight_{i}.log", straight_ports, i) for i in range(2)]
  single = _start(dataset, root / "single", root / "single.log")
  killed = [_start(dataset, root / "killed", root / f"killed_{i}.log", killed_ports, i) for i in range(2)]

  deadline = time.time() + 600
  while _backup_epoch(root / "killed") < 1 and killed[1][0].poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert killed[1][0].poll() is None, "worker 1 ended before it could be killed"
  time.sleep(0.5)  # into epoch 2 (of 3): mid-epoch
  killed[1][0].send_signal(signal.SIGKILL)
  killed[1][0].wait()
  try:  # its peer fails once its collectives lose the killed worker; if it hangs instead, stop it
    killed[0][0].wait(timeout=120)
  except subprocess.TimeoutExpired:
    killed[0][0].kill()
    killed[0][0].wait()
  killed_at = _backup_epoch(root / "killed")
  assert not os.path.exists(root / "killed" / "metrics.json")

  resumed = [_start(dataset, root / "killed", root / f"resumed_{i}.log", killed_ports, i) for i in range(2)]
  results = {"straight": [_wait(p) for p in straight], "single": [_wait(single)],
             "resumed": [_wait(p) for p in resumed]}
  for name, outputs in results.items():
    for code, output in outputs:
      assert code == 0, f"{name}: {output[-3000:]}"
  return root, results, killed_at


def test_two_workers_end_equal_to_each_other_and_to_one_process(runs):
  root, results, _ = runs
  states = [_final_state(output) for _, output in results["straight"]]
  assert states[0] == states[1]  # both workers: the same labels and weights
  # The labelling was sharded: each worker labelled its half and the labels were gathered once.
  assert "sharded over 2 replicas" in results["straight"][0][1]
  single_labels = np.load(root / "single" / "labels.npz")["labels"]
  np.testing.assert_array_equal(np.load(root / "straight" / "labels.npz")["labels"], single_labels)
  single_weights = _weights(root / "single" / "final.weights.h5")
  straight_weights = _weights(root / "straight" / "final.weights.h5")
  assert single_weights.keys() == straight_weights.keys() and single_weights
  for name, value in single_weights.items():
    np.testing.assert_allclose(straight_weights[name], value, atol=1e-5, rtol=0, err_msg=name)


def test_a_killed_worker_resumes_to_the_uninterrupted_runs_labels_and_weights(runs):
  root, results, killed_at = runs
  assert killed_at >= 1
  with open(root / "killed" / "metrics.json") as f:
    assert json.load(f)["resumed_from_epoch"] == killed_at
  states = [_final_state(output) for _, output in results["resumed"]]
  assert states[0] == states[1] == _final_state(results["straight"][0][1])
  np.testing.assert_array_equal(np.load(root / "killed" / "labels.npz")["labels"],
                                np.load(root / "straight" / "labels.npz")["labels"])
