"""benchmarks/relabel_run.py: every labeller on a finished run's network, scored against the classes."""

import json
import os

from absl import flags
import pytest

from selabel_tf import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def relabel_run(load_benchmark):
  """benchmarks/relabel_run.py as a module (its flags removed afterwards)."""
  return load_benchmark("relabel_run")


def test_scores_the_saved_labels_the_argmax_sinkhorn_and_kmeans(relabel_run, make_npz, tmp_path, capsys):
  dataset = make_npz(64, 20, 3)
  run_dir = tmp_path / "run"
  metrics = train.run(train.TrainConfig(dataset=dataset, run_dir=str(run_dir), heads="3,5,3",
                                        architecture="alexnet_small", epochs=1, nopts=2, batch_size=16,
                                        evaluate=False, strategy="default"))
  capsys.readouterr()  # the training's output
  flags.FLAGS(["relabel_run", f"--run_dir={run_dir}", "--lams=1,10", "--balances=argmax,exact"])
  relabel_run.main([])
  lines = capsys.readouterr().out.splitlines()
  assert "heads [0, 2]" in lines[0]  # the heads with K = 3 classes
  rows = {line[:34].strip(): line[34:].split() for line in lines[2:-1]}
  assert list(rows) == ["saved self-labels", "argmax, no balance", "Sinkhorn-Knopp lam 1, argmax",
                        "Sinkhorn-Knopp lam 1, exact", "Sinkhorn-Knopp lam 10, argmax",
                        "Sinkhorn-Knopp lam 10, exact", "K-means on pool5, l2"]
  with open(run_dir / "metrics.json") as f:
    assert json.load(f)["nmi"] == pytest.approx(metrics["nmi"])
  saved = rows["saved self-labels"]
  assert [float(saved[0]), float(saved[3])] == pytest.approx([metrics["nmi"][0], metrics["nmi"][2]], abs=5e-4)
  assert saved[2] == saved[5] == "1.000"  # the saved labels are themselves
  assert rows["Sinkhorn-Knopp lam 10, exact"][1] == rows["Sinkhorn-Knopp lam 10, exact"][4] == "21..22"
