"""Tests of bin/label (selabel_tf.label_folder, selabel_tf.contact_sheets): a folder of real Fashion-MNIST
PNGs clustered from scratch and on the resulting export's frozen features; the report files; bad input."""

import csv
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from selabel_tf import contact_sheets
from selabel_tf import label_folder
from selabel_tf import labels as labels_lib
from selabel_tf.data import sources

from programs import error_lines, run_program, subprocess_program  # pylint: disable=g-bad-import-order

_NUM_IMAGES = 96


def _label_cli(*flags):
  """bin/label in this process (tests/programs.py)."""
  return run_program("label", *flags)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """96 real Fashion-MNIST test images as 28x28 grayscale PNGs in one flat folder (sorted = index order)."""
  dataset, _ = sources.load("fashion_mnist", split="test")
  root = tmp_path_factory.mktemp("folder") / "images"
  root.mkdir()
  images = dataset.images[:_NUM_IMAGES]
  for i, image in enumerate(images):
    Image.fromarray(image[..., 0], mode="L").save(root / f"img{i:03d}.png")
  return root, images


@pytest.fixture(scope="module")
def from_scratch(folder, tmp_path_factory):
  """bin/label from scratch: a 2-epoch SeLa run on the folder, 4 and 3 clusters."""
  root, _ = folder
  out = tmp_path_factory.mktemp("label") / "out"
  result = _label_cli(f"--images={root}", f"--out={out}", "--clusters=4,3", "--epochs=2",
                      "--batch_size=32")
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def _read_clusters(out):
  with open(out / label_folder.CLUSTERS_FILE, newline="") as f:
    return list(csv.reader(f))


def test_from_scratch_writes_the_runs_labels_with_the_exports_confidence(folder, from_scratch):
  root, images = folder
  out, result = from_scratch
  rows = _read_clusters(out)
  assert rows[0] == ["path", "head_0", "confidence_0", "head_1", "confidence_1"]
  assert [r[0] for r in rows[1:]] == [f"img{i:03d}.png" for i in range(_NUM_IMAGES)]
  labels = np.array([[int(r[1]) for r in rows[1:]], [int(r[3]) for r in rows[1:]]])
  np.testing.assert_array_equal(labels, labels_lib.load(str(out / "run" / "labels.npz")))
  # The confidence is the exported model's probability of the image's cluster, in a plain TF load (the
  # folder is decoded as RGB by default: the grayscale PNGs' one channel, three times).
  loaded = tf.saved_model.load(str(out / "model"))
  probabilities = loaded.signatures["probabilities"](images=tf.constant(np.repeat(images, 3, axis=-1)))
  for t in (0, 1):
    expected = probabilities[f"head_{t}"].numpy()[np.arange(_NUM_IMAGES), labels[t]]
    np.testing.assert_allclose([float(r[2 + 2 * t]) for r in rows[1:]], expected, atol=1e-4)
  assert labels[0].max() < 4 and labels[1].max() < 3
  assert "96 images, 0 skipped; method: sela" in result.stdout
  assert "head 0: 4 clusters" in result.stdout and "clusters.csv" in result.stdout


def test_the_report_has_a_sheet_per_cluster_of_its_most_confident_images(folder, from_scratch):
  _, images = folder
  out, _ = from_scratch
  rows = _read_clusters(out)[1:]
  labels = np.array([int(r[1]) for r in rows])
  confidence = np.array([float(r[2]) for r in rows])
  sheets = sorted(os.listdir(out / label_folder.SHEETS_DIR))
  assert sheets == [f"head_0_cluster_{k:03d}.png" for k in range(4)] + \
      [f"head_1_cluster_{k:03d}.png" for k in range(3)]
  sizes = np.bincount(labels, minlength=4)
  cluster = int(sizes.argmax())
  sheet = np.asarray(Image.open(out / label_folder.SHEETS_DIR / f"head_0_cluster_{cluster:03d}.png"))
  assert sheet.shape[-1] == 3
  # 28 px images are upscaled 2x (to >= 48 px) into cells with a 2 px white border, 8 per row.
  first = contact_sheets.most_confident(labels, confidence, cluster, 1)[0]
  members = np.flatnonzero(labels == cluster)
  assert confidence[first] == pytest.approx(confidence[members].max(), abs=1e-4)
  cell = np.repeat(np.repeat(images[first], 2, axis=0), 2, axis=1)
  np.testing.assert_array_equal(sheet[2:58, 2:58], np.repeat(cell, 3, axis=-1))
  assert sheet.shape[0] == 2 + -(-min(64, sizes[cluster]) // 8) * 58
  overview = np.asarray(Image.open(out / label_folder.OVERVIEW_FILE))
  assert overview.shape[0] == 4 * (2 + 56 + 2)  # a row per cluster of head 0, 28 px upscaled 2x (>= 32)
  summary = (out / label_folder.SUMMARY_FILE).read_text()
  assert "  sizes: " + " ".join(f"{k}:{n}" for k, n in enumerate(sizes.tolist())) in summary


def test_from_export_fits_heads_on_the_exports_features(folder, from_scratch, tmp_path):
  root, _ = folder
  out, _ = from_scratch
  result = _label_cli(f"--images={root}", f"--out={tmp_path / 'out'}", f"--from_export={out / 'model'}",
                      "--clusters=5", "--rounds=2")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = _read_clusters(tmp_path / "out")
  assert rows[0] == ["path", "head_0", "confidence_0"] and len(rows) == _NUM_IMAGES + 1
  labels = np.array([int(r[1]) for r in rows[1:]])
  assert set(labels.tolist()) <= set(range(5))
  # Without --layer it clusters the export's embedding (alexnet_small: pool5), not fc7.
  assert "method: export_features (pool5)" in result.stdout
  assert len(os.listdir(tmp_path / "out" / label_folder.SHEETS_DIR)) == 5
  assert not (tmp_path / "out" / "run").exists()  # nothing trained


def test_fit_heads_recovers_separated_clusters():
  from sklearn.metrics import adjusted_rand_score  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 16)) * 10
  truth = np.repeat(np.arange(3), 60)
  features = centres[truth] + rng.normal(size=(180, 16))
  labels, confidence = label_folder.fit_heads(features, (3,), rounds=2, batch_size=32, verbose=0)
  assert labels.shape == (1, 180) and confidence.shape == (1, 180)
  assert adjusted_rand_score(truth, labels[0]) == 1.0
  assert np.bincount(labels[0]).tolist() == [60, 60, 60]
  assert (confidence > 1 / 3).all() and (confidence <= 1 + 1e-6).all()  # above chance; float32 softmax
  assert confidence.mean() > 0.8


@pytest.fixture(scope="module")
def bad_folder(folder, tmp_path_factory):
  """The folder's first 40 images and one file that is not an image."""
  root, _ = folder
  bad = tmp_path_factory.mktemp("bad") / "images"
  bad.mkdir()
  for i in range(40):
    (bad / f"img{i:03d}.png").write_bytes((root / f"img{i:03d}.png").read_bytes())
  (bad / "broken.png").write_bytes(b"not a png")
  return bad


def test_skip_bad_images_leaves_the_file_out_and_lists_it(bad_folder, from_scratch, tmp_path):
  out, _ = from_scratch
  result = _label_cli(f"--images={bad_folder}", f"--out={tmp_path / 'out'}", f"--from_export={out / 'model'}",
                      "--clusters=3", "--rounds=1", "--skip_bad_images")
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(_read_clusters(tmp_path / "out")) == 41
  summary = (tmp_path / "out" / label_folder.SUMMARY_FILE).read_text()
  assert "40 images, 1 skipped" in summary and "skipped broken.png" in summary


@pytest.mark.parametrize("make_flags,needle", [
    (lambda f, b, t: [f"--out={t}/o"], "--images is required"),
    (lambda f, b, t: [f"--images={f}", f"--out={t}/o", "--clusters=a"], "--clusters=a must be"),
    (lambda f, b, t: [f"--images={b}", f"--out={t}/o", "--epochs=1"], "pass --skip_bad_images"),
])
def test_bin_label_bad_input_exits_2_with_one_line(folder, bad_folder, tmp_path, make_flags, needle):
  flags = make_flags(folder[0], bad_folder, tmp_path)
  run = subprocess_program if "--images is required" in needle else run_program  # one end to end
  result = run("label", *flags)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = error_lines(result, "label")
  assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("options,needle", [
    (dict(num_clusters=(1,)), "--clusters=1 must be"),
    (dict(num_clusters=(96,)), "need 1 < K < the 96 images"),
    (dict(epochs=0), "--epochs=0 must be >= 1"),
    (dict(rounds=0), "--rounds=0 must be >= 1"),
    (dict(lam=-1.0), "--lam=-1.0 must be > 0"),
    (dict(architecture="vgg"), "--architecture='vgg' must be one of"),
    (dict(from_export="{tmp}"), "not a selabel_tf export"),
    (dict(from_export="{export}", layer="fc9"), "--layer=fc9: the export's features signature has"),
])
def test_bad_options_name_the_flag_and_write_nothing(folder, from_scratch, tmp_path, options, needle):
  from selabel_tf import train  # pylint: disable=g-import-not-at-top
  paths = {"tmp": str(tmp_path), "export": str(from_scratch[0] / "model")}
  options = {k: v.format(**paths) if isinstance(v, str) else v for k, v in options.items()}
  with pytest.raises(train.ConfigError, match=needle.replace("(", r"\(")):
    label_folder.label_folder(str(folder[0]), str(tmp_path / "o"), verbose=0, **options)
  assert not (tmp_path / "o").exists()


def test_a_missing_folder_is_named(tmp_path):
  from selabel_tf import train  # pylint: disable=g-import-not-at-top
  with pytest.raises(train.ConfigError, match=f"--images={tmp_path}/none: "):
    label_folder.label_folder(str(tmp_path / "none"), str(tmp_path / "o"), verbose=0)
