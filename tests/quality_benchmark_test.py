"""benchmarks/quality.py reads the flagfile under test as bin/train does (the pixel row's data, Table 8)."""

import dataclasses
import os

from absl import flags
import pytest

from selabel_tf import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def quality(load_benchmark):
  """benchmarks/quality.py as a module (its flags removed afterwards)."""
  return load_benchmark("quality")


def test_config_of_follows_nested_flagfiles_and_extra_flags(quality, tmp_path):
  outer = tmp_path / "outer.cfg"
  outer.write_text(f"--flagfile={os.path.join(ROOT, 'configs', 'fashion_mnist.cfg')}\n--epochs=3\n"
                   "--probe_layers=pool5\n")
  config = quality.config_of(str(outer), ["--nopts=2"], "light", 7)
  assert (config.epochs, config.nopts, config.probe_layers) == (3, 2, ("pool5",))
  assert (config.heads, config.lam, config.batch_size) == ("10,10,64,64", 10.0, 128)  # the nested file's
  assert (config.imbalance, config.seed) == ("light", 7)
  assert config.run_dir == "runs/fashion_mnist"


def test_config_of_equals_the_defaults_plus_the_file(quality, tmp_path):
  path = tmp_path / "one.cfg"
  path.write_text("--epochs=5\n")
  assert quality.config_of(str(path), [], "none", 0) == train.TrainConfig(epochs=5, imbalance="none", seed=0)


def test_config_of_names_an_unknown_flag(quality, tmp_path):
  path = tmp_path / "bad.cfg"
  path.write_text("--no_such_flag=1\n")
  with pytest.raises(flags.Error, match="no_such_flag"):
    quality.config_of(str(path), [], "none", 0)


@pytest.mark.parametrize("config,budget_flags", [
    ("fashion_mnist_table8.cfg", {"epochs", "nopts", "probe_layers", "probe_epochs"}),
    # fc_dropout: turned off in the results config, measured at its size only (README "Quality").
    ("fashion_mnist_results.cfg", {"epochs", "nopts", "lr_drops", "probe_epochs", "fc_dropout"}),
])
def test_budget_configs_are_the_default_job_but_for_their_budget(quality, config, budget_flags):
  """The Table 8 and results configs repeat the default job's recipe (so that they run from any working
  directory, which a nested --flagfile would not): they differ from it only in their budget, and the
  results config in its fc dropout."""
  read = lambda name: quality.config_of(os.path.join(ROOT, "configs", name), [], "none", 0)
  default, other = read("fashion_mnist.cfg"), read(config)
  differ = {name for name in train.TrainConfig.__dataclass_fields__
            if getattr(default, name) != getattr(other, name)}
  assert differ == budget_flags | {"run_dir"}


def test_each_training_row_differs_from_the_config_only_in_its_labelling(quality):
  """sela_sk_only labels with Sinkhorn-Knopp at step 0 too (balanced exactly), kmeans with K-means at every
  labelling, supervised with the classes: nothing else of the recipe under test changes."""
  path = os.path.join(ROOT, "configs", "fashion_mnist_table8.cfg")
  base = quality.config_of(path, [], "none", 0)
  expected = {"sela": {},
              "sela_sk_only": {"cold_start_labeller": "same", "labeller_cold_start_balance": "exact"},
              "kmeans": {"labeller": "kmeans"},
              "supervised": {"supervised": True}}
  assert set(quality._TRAIN_FLAGS) == set(expected)
  for row, changed in expected.items():
    config = quality.config_of(path, quality._TRAIN_FLAGS[row], "none", 0)
    differs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(base, f.name)}
    assert differs == changed, row
