"""Tests of the main job: schedule, SelaModel, SelfLabelCallback, the README example, and bin/train."""

import dataclasses
import json
import os
import re
import numpy as np
import pytest
import tensorflow as tf

from selabel_tf import precision
from selabel_tf import schedule
from selabel_tf import train
from selabel_tf.modeling.sela import SelaModel

from programs import error_lines, run_program, subprocess_program  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------
# Schedule


def test_linear_schedule_includes_the_start_and_is_even():
  steps = schedule.labelling_steps(400, 4, "linear")
  assert steps.tolist() == [0, 100, 200, 300]


def test_quadratic_schedule_is_denser_early():
  steps = schedule.labelling_steps(10000, 10, "quadratic")
  assert steps[0] == 0 and len(steps) == 10
  gaps = np.diff(steps)
  assert np.all(np.diff(gaps) > 0)  # gaps grow: denser early
  assert steps.tolist() == [int(10000 * (i / 10) ** 2) for i in range(10)]


def test_schedule_more_labellings_than_steps_fires_every_step():
  assert schedule.labelling_steps(3, 10, "linear").tolist() == [0, 1, 2]


@pytest.mark.parametrize("args,match", [((10, 0, "linear"), "nopts"), ((0, 2, "linear"), "total_steps"),
                                        ((10, 2, "cubic"), "spacing")])
def test_schedule_errors(args, match):
  with pytest.raises(ValueError, match=match):
    schedule.labelling_steps(*args)


# --------------------------------------------------------------------------------------------------
# Model


def test_sela_model_config_round_trip_and_label_lookup():
  model = SelaModel("alexnet_small", (28, 28, 1), (5, 7), 40, name="sela")
  model.build()
  clone = SelaModel.from_config(model.get_config())
  clone.build()
  assert clone.get_config() == model.get_config()
  assert [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in model.weights]
  logits = model(tf.zeros((3, 28, 28, 1)))
  assert [tuple(l.shape) for l in logits] == [(3, 5), (3, 7)]
  model.label_state.assign(np.stack([np.arange(40) % 5, np.arange(40) % 7]), [np.zeros(5), np.zeros(7)])
  head0, head1 = model.label_state.lookup(tf.constant([3, 12, 39]))
  assert head0.numpy().tolist() == [3, 2, 4] and head1.numpy().tolist() == [3, 5, 4]
  assert int(model.label_state.num_labellings.numpy()) == 1


def test_fc_batchnorm_is_the_default_for_alexnet_kept_by_the_twin_and_ignored_by_resnet():
  model = train.TrainConfig(heads="5,7").build_model((28, 28, 1), 40)
  model.build()
  assert model.fc_batchnorm and "fc7_bn" in [layer.name for layer in model.backbone.layers]
  twin = model.label_pass_twin("mixed_bfloat16")  # from the model's config: the same layers
  assert twin.fc_batchnorm and [w.shape for w in twin.weights] == [w.shape for w in model.weights]
  plain = train.TrainConfig(heads="5,7", fc_batchnorm=False).build_model((28, 28, 1), 40)
  assert not plain.fc_batchnorm
  resnet = train.TrainConfig(heads="5", architecture="resnet18").build_model((32, 32, 3), 40)
  assert not resnet.fc_batchnorm  # no fc trunk


def test_a_run_written_before_fc_batchnorm_existed_is_rebuilt_without_it():
  from selabel_tf.evaluation import run_dir as run_dir_lib  # pylint: disable=g-import-not-at-top
  old = json.loads(train.TrainConfig().to_json())
  del old["fc_batchnorm"]
  assert run_dir_lib.config_from_dict(old).fc_batchnorm is False
  assert run_dir_lib.config_from_dict({**old, "fc_batchnorm": True}).fc_batchnorm is True


def test_fc_dropout_reaches_the_model_and_its_twin_and_is_ignored_by_resnet():
  model = train.TrainConfig(heads="5,7", fc_dropout=0.0).build_model((28, 28, 1), 40)
  model.build()
  assert model.fc_dropout == 0.0
  assert [model.backbone.get_layer(f"{fc}_dropout").rate for fc in ("fc6", "fc7")] == [0.0, 0.0]
  twin = model.label_pass_twin("mixed_bfloat16")
  assert twin.fc_dropout == 0.0 and twin.backbone.get_layer("fc7_dropout").rate == 0.0
  default = train.TrainConfig(heads="5,7").build_model((28, 28, 1), 40)
  assert default.fc_dropout == 0.5 and default.backbone.get_layer("fc6_dropout").rate == 0.5
  resnet = train.TrainConfig(heads="5", architecture="resnet18", fc_dropout=0.0).build_model((32, 32, 3), 40)
  assert resnet.fc_dropout == 0.5  # no fc trunk: the flag is ignored


@pytest.mark.parametrize("cpu_flags, twin_policy", [({"avx2", "avx512_bf16"}, "mixed_bfloat16"), ({"avx2"}, None)])
def test_auto_label_pass_precision_builds_a_bfloat16_twin_where_the_cpu_has_bfloat16_units(
    monkeypatch, tiny_npz, tmp_path, cpu_flags, twin_policy):
  monkeypatch.setattr(precision, "cpu_flags", lambda path="/proc/cpuinfo": frozenset(cpu_flags))
  config = train.TrainConfig(dataset=tiny_npz, run_dir=str(tmp_path / "run"), heads="4", batch_size=16,
                             label_pass_precision="auto")
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  model, twin = train.build_model(config, train.build_inputs(config, strategy), strategy)
  assert model.dtype_policy.name == "float32"
  if twin_policy is None:
    assert twin is None  # the label pass runs on the float32 model itself
  else:
    assert twin.dtype_policy.name == twin_policy


def test_config_json_records_what_auto_resolved_to_and_a_resume_where_it_differs_is_refused(
    monkeypatch, tmp_path):
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  config = train.TrainConfig(run_dir=str(tmp_path / "run"), label_pass_precision="auto")
  monkeypatch.setattr(precision, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx512_bf16"}))
  resolved = train.resolve_label_pass_precision(config, strategy)
  assert resolved.label_pass_precision == "mixed_bfloat16" and config.label_pass_precision == "auto"
  train.prepare_run_dir(resolved)
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["label_pass_precision"] == "mixed_bfloat16"
  train.prepare_run_dir(train.resolve_label_pass_precision(config, strategy))  # same hardware: resumes
  monkeypatch.setattr(precision, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx2"}))
  with pytest.raises(train.ConfigError, match=r"differs in --label_pass_precision\)"):
    train.prepare_run_dir(train.resolve_label_pass_precision(config, strategy))


@pytest.mark.parametrize("architecture, features, layer", [
    ("alexnet_small", "embedding", "pool5"), ("alexnet_small", "features", "features"),
    ("resnet18", "embedding", "features")])
def test_the_kmeans_flags_reach_the_self_label_callback(tiny_npz, tmp_path, architecture, features, layer):
  config = train.TrainConfig(dataset=tiny_npz, run_dir=str(tmp_path / "run"), heads="4", batch_size=16,
                             architecture=architecture, nopts=3, cold_start_labellings=2,
                             kmeans_features=features, kmeans_preprocessing="l2", evaluate=False)
  config.validate()
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  inputs = train.build_inputs(config, strategy)
  with strategy.scope():
    model, twin = train.build_model(config, inputs, strategy)
  self_label, _, _ = train.build_callbacks(config, inputs, model, twin, chief=True)
  assert (self_label.cold_start_labeller, self_label.cold_start_labellings) == ("kmeans", 2)
  assert self_label.kmeans_layer == layer
  assert self_label.cold_start_options["preprocessing"] == "l2"


def test_the_kmeans_pca_check_reads_the_layer_k_means_clusters(tiny_npz, tmp_path):
  config = train.TrainConfig(dataset=tiny_npz, run_dir=str(tmp_path / "run"), heads="4", batch_size=16,
                             labeller="kmeans", kmeans_features="embedding", kmeans_pca_dim=5000,
                             evaluate=False)
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  inputs = train.build_inputs(config, strategy)
  with strategy.scope():
    model, twin = train.build_model(config, inputs, strategy)
  with pytest.raises(train.ConfigError, match="PCA to 1024 dimensions needs more than 1024 examples"):
    train.build_callbacks(config, inputs, model, twin, chief=True)  # pool5 of 28 px: 2 x 2 x 256
  config = dataclasses.replace(config, kmeans_preprocessing="l2")  # no PCA: no such bound
  self_label, _, _ = train.build_callbacks(config, inputs, model, twin, chief=True)
  assert self_label.labeller_options["preprocessing"] == "l2"


def test_kmeans_preprocessings_are_the_kmeans_modules():
  from selabel_tf import kmeans  # pylint: disable=g-import-not-at-top
  assert train.KMEANS_PREPROCESSINGS == kmeans.PREPROCESSINGS


@pytest.mark.parametrize("rate", [-0.5, 1.0])
def test_fc_dropout_outside_0_1_is_a_config_error(rate):
  message = rf"^--fc_dropout={rate} must be in \[0, 1\) \(0: no dropout\)$"
  with pytest.raises(train.ConfigError, match=message):
    train.TrainConfig(fc_dropout=rate).validate()


def test_a_run_written_before_fc_dropout_existed_is_rebuilt_with_the_official_rate():
  from selabel_tf.evaluation import run_dir as run_dir_lib  # pylint: disable=g-import-not-at-top
  old = json.loads(train.TrainConfig().to_json())
  del old["fc_dropout"]
  assert run_dir_lib.config_from_dict(old).fc_dropout == 0.5
  assert run_dir_lib.config_from_dict({**old, "fc_dropout": 0.0}).fc_dropout == 0.0


def test_label_state_is_checkpointed_with_the_model(tmp_path):
  model = SelaModel("alexnet_small", (28, 28, 1), (5,), 30, name="sela")
  model.build()
  labels = np.random.default_rng(0).integers(0, 5, size=(1, 30))
  model.label_state.assign(labels, [np.arange(5.0)])
  path = str(tmp_path / "m.weights.h5")
  model.save_weights(path)
  restored = SelaModel("alexnet_small", (28, 28, 1), (5,), 30, name="sela")
  restored.build()
  restored.load_weights(path)
  assert np.array_equal(restored.label_state.current_labels(), labels)
  assert np.array_equal(restored.label_state.warm_start()[0], np.arange(5.0))


def test_dropout_seed_state_is_checkpointed_with_the_model(tmp_path):
  model = SelaModel("alexnet_small", (16, 16, 1), (3,), 10, name="sela")
  model.build()
  states = model.seed_generator_states()
  assert len(states) == 2  # fc6's and fc7's dropout
  for _ in range(3):
    model(tf.zeros((2, 16, 16, 1)), training=True)
  path = str(tmp_path / "m.weights.h5")
  model.save_weights(path)
  restored = SelaModel("alexnet_small", (16, 16, 1), (3,), 10, name="sela")
  restored.build()
  assert not np.array_equal(restored.seed_generator_states()[0].numpy(), states[0].numpy())
  restored.load_weights(path)
  for a, b in zip(restored.seed_generator_states(), states):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  images = tf.random.stateless_uniform((4, 16, 16, 1), seed=(1, 2))
  np.testing.assert_array_equal(restored(images, training=True)[0].numpy(),
                                model(images, training=True)[0].numpy())  # the same next dropout masks


# --------------------------------------------------------------------------------------------------
# The README example: a user's own functional model with the callback.


def test_readme_own_model_example_runs():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  block = re.search(r"<!-- own-model-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  callback, labels = namespace["callback"], namespace["labels"]
  assert int(callback.state.num_labellings.numpy()) == 2
  assert labels.shape == (2, 10000)
  # The labeller's soft assignment is equipartitioned to tol; the argmax labels of a barely trained
  # network are rougher, but use every cluster and are no longer the initial index mod K.
  assert callback.last_metrics["selabel_marginal_error"] <= 0.1
  for head in labels:
    assert np.bincount(head, minlength=10).min() > 0
    assert np.mean(head != np.arange(10000) % 10) > 0.5


# --------------------------------------------------------------------------------------------------
# bin/train: bad input exits 2 with one line naming the flag.


def _train_cli(*flags):
  """bin/train in this process (tests/programs.py); the subprocess cases below run the executable."""
  return run_program("train", *flags)


# Run as their own process: the exit code, the one line and no traceback, end to end (and --cpu_devices,
# which must split the CPU before TensorFlow starts).
_TRAIN_SUBPROCESS_CASES = ("flagfile", "batch")


@pytest.fixture(scope="module")
def tiny_npz(make_npz):
  return make_npz(64, 28, 4)


@pytest.mark.parametrize("name,flags,needle", [
    ("architecture", ["--architecture=vgg"], "--architecture=vgg: value should be one of"),
    ("dataset", ["--dataset=no_such_data"], "--dataset=no_such_data"),
    ("lam", ["--lam=0"], "--lam=0.0 must be > 0"),
    ("heads", ["--heads=x10"], "--heads"),
    ("flagfile", ["--flagfile=/nonexistent/x.cfg"], "/nonexistent/x.cfg"),
    ("batch", ["--strategy=mirrored", "--cpu_devices=2", "--batch_size=3"], "--batch_size=3"),
    ("k_vs_n", ["--heads=64"], "--heads=64"),
    ("balance", ["--labeller_balance=round"], "--labeller_balance=round: value should be one of"),
    ("label_batch", ["--label_batch_size=-1"], "--label_batch_size=-1 must be >= 0"),
    ("cold_start", ["--labeller_cold_start_balance=first"],
     "--labeller_cold_start_balance=first: value should be one of"),
    ("label_pass_precision", ["--label_pass_precision=int8"],
     "--label_pass_precision=int8: value should be one of"),
    ("storage", ["--labeller_storage=int8"], "--labeller_storage=int8: value should be one of"),
    ("knn_k", ["--knn_k=10,many"], "--knn_k=10,many must be a comma list of int values"),
    ("probe_layers", ["--probe_layers=conv1,fc9"], "--probe_layers=conv1,fc9: fc9 is not a layer of"),
    ("kmeans_pca_dim", ["--labeller=kmeans", "--batch_size=16"], "--kmeans_pca_dim=256: the K-means labeller's PCA to 256"),
    ("train_subset", ["--train_subset=65"], "subset=65 must be between 1 and the 64 examples"),
])
def test_cli_bad_input_exits_2_with_one_line(name, flags, needle, tiny_npz, tmp_path):
  run = (lambda *a: subprocess_program("train", *a)) if name in _TRAIN_SUBPROCESS_CASES else _train_cli
  result = run(f"--dataset={tiny_npz}", f"--run_dir={tmp_path / 'run'}", *flags)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = error_lines(result, "train")
  assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("architecture,knn_layer,expected", [
    ("alexnet_small", "", "pool5"),  # empty: the backbone's embedding, AlexNet's conv trunk output
    ("resnet18", "", "features"),
    ("alexnet_small", "features", "features"),  # the paper's fc7 kNN
    ("alexnet_small", "conv2", "conv2"),
])
def test_the_knn_reads_the_backbones_embedding_unless_a_layer_is_named(architecture, knn_layer, expected):
  config = train.TrainConfig(architecture=architecture, knn_layer=knn_layer)
  config.validate()
  assert train.evaluation_options(config).knn_layer == expected


@pytest.mark.parametrize("flags,needle", [
    (["--probe_mode=online"], "--probe_mode=online: value should be one of"),
    (["--labeller=spectral"], "--labeller=spectral: value should be one of"),
    (["--probe_epochs=0"], "--probe_epochs=0 must be >= 1"),
    (["--knn_k=0"], "--knn_k=0 must be a non-empty list of ints >= 1"),
    (["--eval_every_epochs=-1"], "--eval_every_epochs=-1 must be >= 0"),
    (["--architecture=resnet18", "--knn_layer=conv3"], "--knn_layer=conv3: conv3 is not a layer"),
    (["--lr_drops=two"], "--lr_drops=two must be a comma list of int values"),
    (["--relabel_heads=some"], "--relabel_heads=some: value should be one of"),
    (["--cold_start_labeller=spectral"], "--cold_start_labeller=spectral: value should be one of"),
    (["--labeller=kmeans", "--cold_start_labeller=sinkhorn"], "--cold_start_labeller=sinkhorn with --labeller=kmeans"),
    (["--train_subset=-1"], "--train_subset=-1 must be >= 0"),
    (["--nopts=3", "--cold_start_labellings=4"], "--cold_start_labellings=4 must be in [1, --nopts=3]"),
    (["--cold_start_labellings=0"], "--cold_start_labellings=0 must be in [1, --nopts=4]"),
    (["--kmeans_features=fc6"], "--kmeans_features=fc6: value should be one of"),
    (["--kmeans_preprocessing=pca"], "--kmeans_preprocessing=pca: value should be one of"),
    (["--fc_dropout=1"], "--fc_dropout=1.0 must be in [0, 1) (0: no dropout)"),
    (["--eval_subset=-5"], "--eval_subset=-5 must be >= 0"),
    (["--label_store=features", "--label_passes=2"], "--label_store=features keeps one pass's features; "
     "--label_passes=2 averages log-probabilities"),
    (["--label_sharding=some"], "--label_sharding=some: value should be one of"),
    (["--label_matmul_dtype=float16"], "--label_matmul_dtype=float16: value should be one of"),
    (["--label_store=features", "--label_feature_dir=/no/such/dir"],
     "--label_feature_dir=/no/such/dir is not a directory"),
    (["--label_feature_dir=/tmp"], "--label_feature_dir=/tmp keeps the features of --label_store=features "
     "in a file; --label_store is log_probs"),
    (["--label_store=features", "--label_feature_dir=/tmp", "--label_sharding=sharded"],
     "--label_sharding=sharded keeps each replica's share on its device"),
])
def test_flag_values_that_are_not_allowed_name_the_flag(flags, needle):
  """The same path as bin/train (flags from TrainConfig's table, then validate), in this process; the
  subprocess test above shows that such an error exits 2 with one line."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from selabel_tf import cli  # pylint: disable=g-import-not-at-top
  flag_values = absl_flags.FlagValues()
  cli.define_flags(train.TrainConfig, flag_values)
  with pytest.raises((absl_flags.Error, ValueError)) as error:
    flag_values(["train", *flags])
    cli.config_from_flags(train.TrainConfig, flag_values).validate()
  assert needle in str(error.value)


def test_cli_refuses_a_run_dir_of_another_config(tiny_npz, tmp_path):
  run_dir = tmp_path / "run"
  config = train.TrainConfig(dataset=tiny_npz, run_dir=str(run_dir), heads="4", batch_size=16)
  train.prepare_run_dir(config)
  result = _train_cli(f"--dataset={tiny_npz}", f"--run_dir={run_dir}", "--heads=4", "--lam=3",
                      "--batch_size=16")
  assert result.returncode == 2 and "another configuration" in result.stderr and "--lam" in result.stderr
  with open(run_dir / "config.json") as f:
    assert json.load(f)["lam"] == 10.0  # the earlier run's files are intact


def test_a_resumed_run_may_change_only_its_evaluation_and_export(tiny_npz, tmp_path):
  """Evaluation options (e.g. the kNN layer, whose default changed from features to the embedding) may
  differ when a run is resumed, and config.json then records them; a training option may not."""
  run_dir = str(tmp_path / "run")
  base = train.TrainConfig(dataset=tiny_npz, run_dir=run_dir, heads="4", batch_size=16, knn_layer="features")
  train.prepare_run_dir(base)
  resumed = train.TrainConfig(dataset=tiny_npz, run_dir=run_dir, heads="4", batch_size=16, probe_epochs=3,
                              export_dir=str(tmp_path / "export"))
  train.prepare_run_dir(resumed)
  with open(os.path.join(run_dir, "config.json")) as f:
    recorded = json.load(f)
  assert recorded["knn_layer"] == "" and recorded["probe_epochs"] == 3
  assert {"knn_layer", "probe_epochs", "eval_every_epochs", "export_dir", "label_feature_dir"} <= \
      train.MAY_CHANGE_ON_RESUME
  assert not {"lam", "heads", "epochs", "batch_size", "seed", "dataset"} & train.MAY_CHANGE_ON_RESUME
  with pytest.raises(train.ConfigError, match=r"differs in --epochs\)"):
    train.prepare_run_dir(train.TrainConfig(dataset=tiny_npz, run_dir=run_dir, heads="4", batch_size=16,
                                            epochs=7, knn_layer="features"))


@pytest.mark.parametrize("config", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_every_config_passes_validation(config, tmp_path):
  """Each shipped flagfile holds only known flags and allowed values: the run gets as far as loading
  the dataset (here one that does not exist)."""
  result = _train_cli(f"--flagfile={os.path.join(ROOT, 'configs', config)}", "--dataset=/nonexistent",
                      f"--run_dir={tmp_path / 'run'}")
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("train: error: --dataset=/nonexistent"), \
      result.stderr


# --------------------------------------------------------------------------------------------------
# --help of every bin/ program; a short run with its evaluation; bin/evaluate.


_GROUPS = {"train": ["data:", "model:", "optimisation:", "self-labelling:", "evaluation:", "runtime:"],
           "evaluate": ["evaluation:", "run:"]}


@pytest.mark.parametrize("program,flag", [("train", "--help"), ("train", "--helpfull"), ("evaluate", "-h")])
def test_every_program_prints_its_flags_with_help(program, flag):
  groups = _GROUPS[program]
  result = (subprocess_program if flag == "--help" else run_program)(program, flag)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith(f"usage: {program} ")
  for group in groups:
    assert f"\n{group}\n" in result.stdout, group
  expected = ["--knn_k", "--probe_epochs"] + (["--labeller: <sinkhorn|kmeans>", "--lam"]
                                              if program == "train" else ["--run_dir", "--random_init"])
  for needle in expected:
    assert needle in result.stdout, needle


def test_every_config_field_is_a_flag_with_help():
  """One table: each TrainConfig field declares its help, and fields with choices become enums."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  for field in dataclasses.fields(train.TrainConfig):
    assert field.metadata.get("help"), field.name
    assert field.metadata.get("group"), field.name
  assert dataclasses.fields(train.TrainConfig)  # non-empty
  choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(train.TrainConfig)
             if f.metadata.get("choices")}
  from selabel_tf.modeling import backbones  # pylint: disable=g-import-not-at-top
  assert choices["architecture"] == backbones.BACKBONES


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, make_npz):
  """A 2-epoch bin/train run with its evaluation at the end (the test suite's smoke run; evaluating every
  epoch is tested in evaluation_test.py)."""
  dataset = make_npz(96, 20, 3)
  run_dir = tmp_path_factory.mktemp("smoke") / "run"
  result = _train_cli(f"--dataset={dataset}", f"--run_dir={run_dir}", "--architecture=resnet18",
                      "--heads=3,5", "--epochs=2", "--nopts=2", "--batch_size=16", "--probe_epochs=1",
                      "--knn_k=3,10", "--strategy=default")
  assert result.returncode == 0, result.stderr[-3000:]
  return dataset, run_dir


def test_a_run_writes_a_complete_run_dir_with_its_evaluation(finished_run):
  _, run_dir = finished_run
  for name in ("config.json", "flags.txt", "labels.npz", "final.weights.h5", "metrics.json"):
    assert (run_dir / name).is_file(), name
  assert os.listdir(run_dir / "tensorboard" / "evaluation")
  flagfile = (run_dir / "flags.txt").read_text().splitlines()
  assert "--heads=3,5" in flagfile and "--lam=10.0" in flagfile and "--knn_k=3,10" in flagfile
  with open(run_dir / "metrics.json") as f:
    metrics = json.load(f)
  layers = ["stem", "block1", "block2", "block3", "block4", "features"]
  expected = (["knn_top1/features/k=3", "knn_top1/features/k=10", "probe_best_layer", "probe_best_test_top1",
               "evaluation_seconds", "seconds_per_epoch", "nmi", "ari", "final_loss"]
              + [f"probe_{s}_top1/{layer}" for s in ("train", "test") for layer in layers]
              + [f"cluster_{s}/head_{t}/{m}" for s in ("selabel", "test") for t in (0, 1)
                 for m in ("nmi", "adjusted_nmi", "ari", "hungarian_accuracy", "size_min", "size_max")]
              + ["cluster_selabel/head_1/majority_accuracy"])
  missing = [k for k in expected if k not in metrics]
  assert not missing, missing
  assert metrics["probe_best_layer"] in layers
  assert metrics["cluster_selabel/head_0/nmi"] == pytest.approx(metrics["nmi"][0])
  # Each labelling's record (--nopts=2: at steps 0 and 6 of 12), its NMI against the classes; the last
  # relabelled every head, so its figures are the final labels'.
  records = metrics["labellings"]
  assert [(r["labelling"], r["step"], r["labeller"], r["heads"]) for r in records] == [
      (1, 0, "kmeans", [0, 1]), (2, 6, "sinkhorn", [0, 1])]
  assert records[-1]["nmi"] == pytest.approx(metrics["nmi"]) and records[-1]["ari"] == pytest.approx(metrics["ari"])
  for key in expected[:2]:
    assert 0 <= metrics[key] <= 1


def _evaluate_cli(*flags):
  """bin/evaluate in this process (tests/programs.py)."""
  return run_program("evaluate", *flags)


def test_bin_evaluate_writes_evaluation_json_and_a_table(finished_run, tmp_path):
  _, run_dir = finished_run
  output = tmp_path / "evaluation.json"
  result = _evaluate_cli(f"--run_dir={run_dir}", "--probe_epochs=1", "--knn_k=3,10",
                         f"--output={output}", "--verbose=0")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(output) as f:
    evaluation = json.load(f)
  with open(run_dir / "metrics.json") as f:
    metrics = json.load(f)
  # The same weights, data and protocol as the run's own final evaluation: the same kNN and clusters.
  for key in ("knn_top1/features/k=3", "knn_top1/features/k=10", "cluster_test/head_0/nmi",
              "cluster_selabel/head_1/ari"):
    assert evaluation[key] == pytest.approx(metrics[key], abs=1e-6), key
  assert evaluation["weights"].endswith("final.weights.h5") and evaluation["random_init"] is False
  assert "weighted kNN top-1 (test)" in result.stdout and "linear probes" in result.stdout
  assert "<- best" in result.stdout

  random = _evaluate_cli(f"--run_dir={run_dir}", "--random_init", "--probe_epochs=1", "--knn_k=3",
                         "--verbose=0")
  assert random.returncode == 0, random.stderr[-3000:]
  with open(run_dir / "evaluation_random_init.json") as f:
    untrained = json.load(f)
  assert untrained["random_init"] is True and "knn_top1/features/k=3" in untrained
  assert not any(k.startswith("cluster_selabel/") for k in untrained)


@pytest.mark.parametrize("make_flags,needle", [
    (lambda run_dir, tmp: [f"--run_dir={tmp / 'nowhere'}"], "no such directory"),
    (lambda run_dir, tmp: [], "pass exactly one of --run_dir"),
    (lambda run_dir, tmp: [f"--run_dir={run_dir}", f"--export_dir={tmp}"], "pass exactly one of --run_dir"),
    (lambda run_dir, tmp: [f"--export_dir={tmp}"], "not a selabel_tf export"),
    (lambda run_dir, tmp: [f"--export_dir={tmp}", "--random_init"], "--random_init needs --run_dir"),
    (lambda run_dir, tmp: [f"--run_dir={run_dir}", "--knn_k=0"], "--knn_k=0 must be"),
])
def test_bin_evaluate_bad_input_exits_2_with_one_line(finished_run, tmp_path, make_flags, needle):
  _, run_dir = finished_run
  flags = make_flags(run_dir, tmp_path)
  run = subprocess_program if not flags else run_program  # one case end to end, as its own process
  result = run("evaluate", *flags)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = error_lines(result, "evaluate")
  assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_a_directory_that_is_not_a_run_is_named(tmp_path):
  from selabel_tf.evaluation import run_dir as run_dir_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(run_dir_lib.RunDirError, match="no config.json"):
    run_dir_lib.load_config(str(tmp_path))


def test_bin_evaluate_without_weights_exits_2(finished_run, tmp_path):
  _, run_dir = finished_run
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "config.json").write_text((run_dir / "config.json").read_text())
  result = _evaluate_cli(f"--run_dir={bare}")
  assert result.returncode == 2
  assert "no final.weights.h5 and no backup weights; pass --random_init" in result.stderr


def test_run_leaves_the_dtype_policy_as_it_found_it(make_npz, tmp_path):
  import keras  # pylint: disable=g-import-not-at-top
  dataset = make_npz(32, 16, 2)
  before = keras.mixed_precision.global_policy().name
  config = train.TrainConfig(dataset=dataset, run_dir=str(tmp_path / "run"), architecture="resnet18",
                             heads="2", epochs=1, nopts=1, batch_size=16, mixed_precision=True,
                             evaluate=False, strategy="default")
  train.run(config)
  assert keras.mixed_precision.global_policy().name == before == "float32"


def test_label_feature_dir_labels_from_a_file_and_leaves_nothing(make_npz, tmp_path, monkeypatch):
  """--label_feature_dir reaches the labelling: each Sinkhorn-Knopp labelling keeps the features in a file
  there (counted), and the directory is empty after the run."""
  from selabel_tf import label_store  # pylint: disable=g-import-not-at-top
  files_made = []
  original = label_store.FeatureFile.__init__

  def counting_init(self, directory, shape, dtype):
    files_made.append((directory, tuple(shape)))
    original(self, directory, shape, dtype)

  monkeypatch.setattr(label_store.FeatureFile, "__init__", counting_init)
  spill = tmp_path / "spill"
  spill.mkdir()
  config = train.TrainConfig(dataset=make_npz(32, 16, 2), run_dir=str(tmp_path / "run"), heads="3,2",
                             epochs=2, nopts=2, batch_size=16, evaluate=False, strategy="default",
                             cold_start_labeller="same", label_store="features",
                             label_feature_dir=str(spill))
  train.run(config)
  assert [d for d, _ in files_made] == [str(spill)] * 2 and files_made[0][1][0] == 32
  assert os.listdir(spill) == []
  assert np.load(tmp_path / "run" / "labels.npz")["labels"].shape == (2, 32)


def test_the_default_config_smoke_run_writes_a_complete_run_dir(tmp_path):
  """configs/fashion_mnist.cfg as the README's first command runs it, shortened: a 1,024-image subset of the
  real Fashion-MNIST, one epoch, tested on 1,000 test images; the run directory and metrics.json are
  complete."""
  run_dir = tmp_path / "run"
  result = _train_cli("--flagfile=" + os.path.join(ROOT, "configs", "fashion_mnist.cfg"), f"--run_dir={run_dir}",
                      "--train_subset=1024", "--eval_subset=1000", "--epochs=1", "--probe_epochs=1",
                      "--eval_batch_size=512")
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("config.json", "flags.txt", "labels.npz", "final.weights.h5", "metrics.json"):
    assert (run_dir / name).is_file(), name
  with open(run_dir / "metrics.json") as f:
    metrics = json.load(f)
  with open(run_dir / "config.json") as f:
    config = json.load(f)
  heads = len(config["heads"].split(","))
  layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "features"]
  expected = ([f"knn_top1/pool5/k={k}" for k in (10, 50, 200)] + ["probe_best_layer", "evaluation_seconds",
              "seconds_per_epoch", "train_seconds", "nmi", "ari", "selabel_seconds"]
              + [f"probe_test_top1/{layer}" for layer in layers]
              + [f"cluster_{s}/head_{t}/nmi" for s in ("selabel", "test") for t in range(heads)])
  missing = [k for k in expected if k not in metrics]
  assert not missing, missing
  assert metrics["num_examples"] == 1024 and len(metrics["nmi"]) == heads
  labels = np.load(run_dir / "labels.npz")["labels"]
  assert labels.shape == (heads, 1024)


def test_eval_subset_tests_on_a_seeded_subset_of_the_test_split():
  from selabel_tf.data import sources  # pylint: disable=g-import-not-at-top
  full, full_truth = sources.load("fashion_mnist", split="test")
  chosen = []
  for seed in (3, 4):
    data = train.build_evaluation_data(train.TrainConfig(dataset="fashion_mnist", train_subset=100,
                                                         eval_subset=1000, seed=seed))
    index = data.test.original_index
    assert data.test.num_examples == 1000 == len(np.unique(index)) and data.train.num_examples == 100
    np.testing.assert_array_equal(data.test.images, full.images[index])
    np.testing.assert_array_equal(data.test_truth.labels, full_truth.labels[index])
    chosen.append(index)
  assert not np.array_equal(chosen[0], chosen[1])
  whole = train.build_evaluation_data(train.TrainConfig(dataset="fashion_mnist", train_subset=100))
  assert whole.test.num_examples == 10000


def test_supervised_trains_one_head_on_the_classes_and_never_relabels(make_npz, tmp_path):
  dataset = make_npz(64, 20, 3)
  run_dir = tmp_path / "run"
  metrics = train.run(train.TrainConfig(dataset=dataset, run_dir=str(run_dir), supervised=True, heads="7,9",
                                        architecture="alexnet_small", epochs=2, batch_size=16,
                                        probe_epochs=1, knn_k=(3,), strategy="default"))
  truth = np.load(dataset)["labels"]
  labels = np.load(run_dir / "labels.npz")["labels"]
  np.testing.assert_array_equal(labels, truth[None])  # one head, K = 3 classes, the class labels
  assert "nmi" not in metrics and "selabel_seconds" not in metrics and "labellings" not in metrics
  assert "cluster_test/head_0/nmi" in metrics and "cluster_test/head_1/nmi" not in metrics


# --------------------------------------------------------------------------------------------------
# bin/train on an image folder, as a new user tries it.


def _image_folder(root, count, size=(32, 32), bad=()):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for i in range(count):
    target = root / ("a" if i % 2 else "b") / f"img_{i:03d}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(target)
  for name in bad:
    (root / name).write_text("not an image")
  return root


def test_bin_train_on_an_image_folder_uses_its_size_and_writes_file_paths(tmp_path):
  folder = _image_folder(tmp_path / "images", 40, bad=("a/broken.png",))
  run_dir = tmp_path / "run"
  common = [f"--dataset={folder}", f"--run_dir={run_dir}", "--heads=3", "--epochs=1", "--batch_size=8",
            "--noevaluate", "--strategy=default"]
  result = _train_cli(*common)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  lines = error_lines(result, "train")
  assert len(lines) == 1 and "broken.png" in lines[0] and "--skip_bad_images" in lines[0], result.stderr[-2000:]
  assert "on_bad" not in lines[0]
  result = _train_cli(*common, "--skip_bad_images")
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.load(open(run_dir / "config.json"))["image_size"] is None
  from selabel_tf import labels as labels_lib  # pylint: disable=g-import-not-at-top
  label_file = labels_lib.read(str(run_dir / "labels.csv"))
  expected = sorted(f"{'a' if i % 2 else 'b'}/img_{i:03d}.png" for i in range(40))
  assert label_file.source_ids.tolist() == expected  # the file paths, in index order; broken.png left out
  np.testing.assert_array_equal(label_file.labels, np.load(run_dir / "labels.npz")["labels"])
  assert open(run_dir / "labels.csv").readline().strip() == "index,path,head_0"


def test_bin_train_on_an_image_folder_of_mixed_sizes_asks_for_image_size(tmp_path):
  folder = _image_folder(tmp_path / "images", 6)
  _image_folder(tmp_path / "images" / "a", 1, size=(40, 30))
  result = _train_cli(f"--dataset={folder}", f"--run_dir={tmp_path / 'run'}", "--heads=2", "--batch_size=4")
  lines = error_lines(result, "train")
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert "32x32 (6 files), 40x30 (1 files)" in lines[0] and "--image_size" in lines[0]


# --------------------------------------------------------------------------------------------------
# --labels_from: label transfer (paper Table 5).


def test_labels_from_trains_on_exactly_the_files_labels_and_never_relabels(make_npz, tmp_path):
  from selabel_tf import labels as labels_lib  # pylint: disable=g-import-not-at-top
  dataset = make_npz(64, 20, 3)
  rng = np.random.default_rng(5)
  given = np.stack([rng.integers(0, 4, 64), rng.integers(0, 6, 64)]).astype(np.int32)
  source = tmp_path / "given.csv"
  source.write_text(labels_lib.to_csv(given, np.arange(64)))
  run_dir = tmp_path / "run"
  metrics = train.run(train.TrainConfig(dataset=dataset, run_dir=str(run_dir), labels_from=str(source),
                                        heads="4,6", epochs=2, batch_size=16, probe_epochs=1, knn_k=(3,),
                                        strategy="default"))
  np.testing.assert_array_equal(np.load(run_dir / "labels.npz")["labels"], given)
  assert "selabel_seconds" not in metrics  # no labelling ran
  assert len(metrics["nmi"]) == 2  # the file's labels, measured against the classes


@pytest.mark.parametrize("labels,heads,needle", [
    (np.zeros((2, 50), np.int32), "4,6", "has labels for 50 examples, --dataset="),
    (np.zeros((3, 64), np.int32), "4,6", "has 3 heads, --heads=4,6 has 2; pass e.g. --heads=1,1,1"),
    (np.full((2, 64), 7, np.int32), "4,6", "head 0 has labels up to 7, --heads=4,6 gives it K=4"),
])
def test_labels_from_a_file_that_does_not_fit_exits_2_with_one_line(tiny_npz, tmp_path, labels, heads, needle):
  from selabel_tf import labels as labels_lib  # pylint: disable=g-import-not-at-top
  source = tmp_path / "given.npz"
  np.savez(source, labels=labels, source_ids=np.arange(labels.shape[1]))
  result = _train_cli(f"--dataset={tiny_npz}", f"--run_dir={tmp_path / 'run'}", f"--labels_from={source}",
                      f"--heads={heads}", "--batch_size=16")
  lines = error_lines(result, "train")
  assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  del labels_lib
