"""Tests of the SavedModel export: plain-TF and TFSMLayer use without selabel_tf, agreement with the
in-package model, metadata, atomic replacement, gfile (ram://) and bin/export."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from selabel_tf import export
from selabel_tf import files
from selabel_tf import train
from selabel_tf.data import augment
from selabel_tf.evaluation import probes
from selabel_tf.evaluation import run_dir as run_dir_lib

from programs import error_lines, run_program, subprocess_program  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run first in a child process: nothing named selabel_tf can be imported, whatever the environment holds
# (the package is installed in the virtualenv in editable mode).
_NO_SELABEL = textwrap.dedent("""
    import sys
    sys.path = [p for p in sys.path if p and p.rstrip("/") != %r]

    class _Blocker:
      def find_spec(self, name, path=None, target=None):
        if name == "selabel_tf" or name.startswith("selabel_tf."):
          raise ImportError("selabel_tf must not be imported here")
        return None

    sys.meta_path.insert(0, _Blocker())
    """) % ROOT


def _run_without_package(script: str, cwd) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and "selabel" not in v}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return subprocess.run([sys.executable, "-c", _NO_SELABEL + textwrap.dedent(script)], cwd=cwd,
                        capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A one-epoch run on 512 real Fashion-MNIST images, exported by bin/train's --export_dir path; with
  64 real images, their in-package features and head probabilities."""
  base = tmp_path_factory.mktemp("export")
  config = train.TrainConfig(dataset="fashion_mnist", train_subset=512, epochs=1, nopts=1, batch_size=64,
                             heads="10,16", evaluate=False, strategy="default", run_dir=str(base / "run"),
                             export_dir=str(base / "export"))
  train.run(config)
  restored = run_dir_lib.restore(config.run_dir)
  images = restored.dataset.images[:64]
  transform = restored.dataset.augment_config(28, "none")
  activations = restored.model.backbone(augment.evaluation_batch(images, transform), training=False)
  probabilities = [tf.nn.softmax(l).numpy() for l in restored.model.heads(activations["features"])]
  layers = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")
  pooled = probes.activation_pooling(restored.model.backbone, layers)(activations)  # as the probes read them
  np.save(base / "images.npy", images)
  return {"dir": base / "export", "run_dir": config.run_dir, "base": base, "images": images,
          "features": activations["features"].numpy(), "probabilities": probabilities,
          "pooled": {layer: pooled[layer].numpy() for layer in layers}, "restored": restored}


def test_plain_tensorflow_loads_the_export_without_selabel_tf(exported):
  result = _run_without_package(f"""
      import json, sys
      import numpy as np
      import tensorflow as tf
      loaded = tf.saved_model.load({str(exported["dir"])!r})
      images = tf.constant(np.load({str(exported["base"] / "images.npy")!r}))
      out = {{}}
      for name, value in loaded.signatures["features"](images=images).items():
        out["features/" + name] = value.numpy()
      for name, value in loaded.signatures["probabilities"](images=images).items():
        out["probabilities/" + name] = value.numpy()
      for name, value in loaded.signatures["assign"](images=images).items():
        out["assign/" + name] = value.numpy()
      out["metadata"] = np.array(loaded.signatures["metadata"]()["json"].numpy().decode())
      out["larger"] = loaded.signatures["assign"](images=tf.cast(tf.image.resize(images, [56, 42]), tf.uint8))["clusters"].numpy()
      assert not any(m.startswith("selabel_tf") for m in sys.modules), "selabel_tf was imported"
      np.savez({str(exported["base"] / "plain.npz")!r}, **out)
      """, cwd=exported["base"])
  assert result.returncode == 0, result.stderr[-3000:]
  out = np.load(exported["base"] / "plain.npz")
  np.testing.assert_allclose(out["features/features"], exported["features"], atol=1e-5)
  for layer, expected in exported["pooled"].items():
    assert out[f"features/{layer}"].dtype == np.float32
    np.testing.assert_allclose(out[f"features/{layer}"], expected, atol=1e-5, err_msg=layer)
  for t, expected in enumerate(exported["probabilities"]):
    np.testing.assert_allclose(out[f"probabilities/head_{t}"], expected, atol=1e-5)
  clusters = out["assign/clusters"]
  assert clusters.shape == (64, 2) and clusters.dtype == np.int32
  # Agreement with the in-package argmax wherever the top two probabilities are not within float noise.
  for t, expected in enumerate(exported["probabilities"]):
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5
    np.testing.assert_array_equal(clusters[clear, t], expected.argmax(1)[clear])
    np.testing.assert_allclose(out["assign/confidence"][:, t], expected.max(1), atol=1e-5)
  assert out["larger"].shape == (64, 2)
  assert json.loads(str(out["metadata"])) == export.load_metadata(exported["dir"])


def test_tfsmlayer_fine_tunes_a_new_head_with_the_trunk_frozen_without_selabel_tf(exported):
  result = _run_without_package(f"""
      import numpy as np
      import keras
      import tensorflow as tf
      trunk = keras.layers.TFSMLayer({str(exported["dir"])!r}, call_endpoint="features", trainable=False)
      images = keras.Input((28, 28, 1), dtype="uint8")
      features = trunk(images)["features"]
      logits = keras.layers.Dense(10, name="new_head")(features)
      model = keras.Model(images, logits)
      model.compile(optimizer=keras.optimizers.SGD(0.1),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
      x = np.load({str(exported["base"] / "images.npy")!r})
      y = np.arange(len(x)) % 10
      trunk_before = [w.numpy().copy() for w in trunk.weights]
      head_before = model.get_layer("new_head").kernel.numpy().copy()
      model.fit(x, y, batch_size=16, epochs=1, verbose=0)
      assert len(model.trainable_weights) == 2, [w.name for w in model.trainable_weights]
      assert trunk.weights and all(np.array_equal(a, w.numpy()) for a, w in zip(trunk_before, trunk.weights))
      assert not np.allclose(head_before, model.get_layer("new_head").kernel.numpy())
      print("OK", len(trunk.weights))
      """, cwd=exported["base"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().startswith("OK")


def test_metadata_names_the_model_input_and_data(exported):
  metadata = export.load_metadata(exported["dir"])
  restored = exported["restored"]
  mean, std = restored.dataset.normalization()
  assert metadata["format"] == export.FORMAT
  assert metadata["architecture"] == "alexnet_small" and metadata["heads"] == [10, 16]
  assert metadata["input"]["image_size"] == 28 and metadata["input"]["channels"] == 1
  assert metadata["input"]["dtype"] == "uint8"
  assert metadata["normalization"] == {"mean": list(mean), "std": list(std)}
  assert metadata["dataset"] == "fashion_mnist" and metadata["num_examples"] == 512
  assert metadata["signatures"]["features"]["features"] == 4096
  assert metadata["embedding"] == "pool5" and metadata["signatures"]["features"]["pool5"] == 2 * 2 * 256
  assert metadata["signatures"]["probabilities"] == {"head_0": 10, "head_1": 16}
  assert metadata["commit"] is None or len(metadata["commit"].split("+")[0]) == 40
  assert export.is_export(exported["dir"]) and not export.is_export(exported["run_dir"])


def test_a_second_export_replaces_the_first_whole_and_a_failed_one_leaves_it(exported, tmp_path):
  target = tmp_path / "model"
  restored = exported["restored"]
  transform = restored.dataset.augment_config(28, "none")
  export.export_model(restored.model, str(target), transform, probe_layers=["conv1"])
  (target / "stale.txt").write_text("from the first export")
  export.export_model(restored.model, str(target), transform, probe_layers=["conv2"])
  assert not (target / "stale.txt").exists()
  # The embedding (pool5) always comes with the chosen probe layers.
  assert set(export.load_metadata(target)["signatures"]["features"]) == {"features", "conv2", "pool5"}

  def failing(directory):
    tf.io.gfile.makedirs(directory)
    (tmp_path / "half").write_text("")
    with open(os.path.join(directory, "saved_model.pb"), "w") as f:
      f.write("half written")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    files.replace_directory(str(target), failing)
  assert set(export.load_metadata(target)["signatures"]["features"]) == {"features", "conv2", "pool5"}
  assert sorted(os.listdir(tmp_path)) == ["half", "model"]  # no temporary directory left beside it
  loaded = tf.saved_model.load(str(target))
  np.testing.assert_allclose(loaded.signatures["features"](images=tf.constant(exported["images"]))["features"],
                             exported["features"], atol=1e-5)


def test_export_and_run_dir_files_go_through_gfile_ram_filesystem(exported):
  restored = exported["restored"]
  transform = restored.dataset.augment_config(28, "none")
  target = "ram://selabel_export_test/model"
  for layers in (["conv1"], ["conv5"]):  # the second replaces the first (file-by-file move)
    export.export_model(restored.model, target, transform, probe_layers=layers)
  assert sorted(tf.io.gfile.listdir("ram://selabel_export_test")) == ["model"]
  assert set(export.load_metadata(target)["signatures"]["features"]) == {"features", "conv5", "pool5"}
  loaded = tf.saved_model.load(target)
  np.testing.assert_allclose(loaded.signatures["features"](images=tf.constant(exported["images"]))["features"],
                             exported["features"], atol=1e-5)
  files.write_text("ram://selabel_export_test/run/config.json", '{"a": 1}')
  files.write_atomically("ram://selabel_export_test/run/labels.npz",
                         lambda tmp: np.savez(tmp, labels=np.arange(5)))
  assert json.loads(files.read_text("ram://selabel_export_test/run/config.json")) == {"a": 1}
  assert sorted(tf.io.gfile.listdir("ram://selabel_export_test/run")) == ["config.json", "labels.npz"]
  tf.io.gfile.rmtree("ram://selabel_export_test")


def _export_cli(*flags):
  """bin/export in this process (tests/programs.py)."""
  return run_program("export", *flags)


@pytest.mark.parametrize("make_flags,needle", [
    (lambda e, t: [f"--export_dir={t}"], "--run_dir is required"),
    (lambda e, t: [f"--run_dir={t}/none", f"--export_dir={t}/x"], "no such directory"),
    (lambda e, t: [f"--run_dir={e['run_dir']}", f"--export_dir={t}/x", "--probe_layers=fc9"],
     "probe layer 'fc9' is not an output"),
])
def test_bin_export_bad_input_exits_2_with_one_line(exported, tmp_path, make_flags, needle):
  flags = make_flags(exported, tmp_path)
  run = subprocess_program if "--run_dir is required" in needle else run_program  # one end to end
  result = run("export", *flags)
  assert result.returncode == 2
  lines = error_lines(result, "export")
  assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "x").exists()


def test_bin_export_writes_a_loadable_export(exported, tmp_path):
  result = _export_cli(f"--run_dir={exported['run_dir']}", f"--export_dir={tmp_path / 'cli'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "signatures features, probabilities, assign, metadata" in result.stdout
  loaded = tf.saved_model.load(str(tmp_path / "cli"))
  np.testing.assert_allclose(loaded.signatures["features"](images=tf.constant(exported["images"]))["features"],
                             exported["features"], atol=1e-5)


def test_the_export_stores_each_weight_once(exported):
  """The checkpoint holds the backbone's and heads' weights once (tracking the model as well as the
  endpoints wrote each twice, keras-team/keras#23553), and nothing else of the model."""
  model = exported["restored"].model
  expected = sum(int(np.prod(w.shape)) for w in model.backbone.weights + model.heads.weights)
  reader = tf.train.load_checkpoint(str(exported["dir"] / "variables" / "variables"))
  stored = [shape for key, shape in reader.get_variable_to_shape_map().items()
            if key.endswith("VARIABLE_VALUE")]
  assert sum(int(np.prod(shape)) for shape in stored) == expected


def test_bin_evaluate_of_the_export_gives_its_run_dirs_numbers(exported, tmp_path):
  """The same evaluation of the run directory and of its export, on 500 real test images: the export's
  in-graph transform and signatures give the run's activations (within 1e-5, above; the same once stored
  as float16), hence the same neighbours, head argmaxes and probes (seeded, layer by layer in the same
  order)."""
  common = ["--probe_epochs=2", "--knn_k=3,10", "--eval_subset=500", "--verbose=0"]
  results = {}
  for name, flag in (("run", f"--run_dir={exported['run_dir']}"), ("export", f"--export_dir={exported['dir']}")):
    result = run_program("evaluate", flag, *common, f"--output={tmp_path / name}.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weighted kNN top-1 (test)" in result.stdout
    with open(tmp_path / f"{name}.json") as f:
      results[name] = json.load(f)
  from_run, from_export = results["run"], results["export"]
  assert from_export["export_dir"] == str(exported["dir"]) and from_export["run_dir"] == exported["run_dir"]
  compared = [k for k in from_run if k.startswith(("knn_top1/", "cluster_test/", "probe_"))
              and not k.endswith("_seconds") and k != "probe_best_layer"]
  assert len(compared) > 20 and not set(compared) - set(from_export)
  assert not any(k.startswith("cluster_selabel/") for k in from_export)  # the self-labels are the run's
  for key in compared:
    assert from_export[key] == pytest.approx(from_run[key], abs=1e-6), key
  assert from_export["probe_best_layer"] == from_run["probe_best_layer"]


def test_a_run_writes_its_labels_as_csv_that_load_reads_back_as_the_npz(exported, tmp_path):
  from selabel_tf import labels as labels_lib  # pylint: disable=g-import-not-at-top
  run_dir = exported["run_dir"]
  from_npz = labels_lib.load(os.path.join(run_dir, "labels.npz"))
  from_csv = labels_lib.load(os.path.join(run_dir, "labels.csv"))
  assert from_npz.shape == (2, 512) and from_npz.dtype == np.int32
  np.testing.assert_array_equal(from_csv, from_npz)
  np.testing.assert_array_equal(from_npz, exported["restored"].model.label_state.current_labels())
  rows = open(os.path.join(run_dir, "labels.csv")).read().splitlines()
  assert rows[0] == "index,source_index,head_0,head_1" and len(rows) == 513
  source = exported["restored"].dataset.original_index
  assert rows[1] == f"0,{source[0]},{from_npz[0, 0]},{from_npz[1, 0]}"
  bad = tmp_path / "bad.csv"
  bad.write_text("index,source_index,head_0\n1,0,3\n0,1,2\n")
  with pytest.raises(ValueError, match="index column must be 0..1 in order"):
    labels_lib.load(str(bad))
  with pytest.raises(ValueError, match="must be a .npz or .csv"):
    labels_lib.load(str(tmp_path / "labels.txt"))
