"""Tests for `selabel_tf.data.image_folder`: image folders decoded to uint8 [N, S, S, C].

Every folder is made of real files written by PIL in `tmp_path`: PNG and JPEG of mixed sizes and modes,
a truncated JPEG (a valid one cut in half) and a text file named `.png`. Expected pixels come from PIL
calls written out here, not from the module.
"""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from selabel_tf.data import image_folder

_SIZE = 16
_LOGGER = "selabel_tf.data.image_folder"


# --------------------------------------------------------------------------------------------------
# Folders.


def _noise(seed, width, height, mode):
  """A PIL image of uniform noise in `mode` ("L", "RGB", "RGBA" or "P")."""
  rng = np.random.default_rng(seed)
  if mode == "P":
    image = Image.fromarray(rng.integers(0, 8, (height, width), dtype=np.uint8), "P")
    image.putpalette(rng.integers(0, 256, 8 * 3, dtype=np.uint8).tolist())
    return image
  bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
  pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
  return Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode)


# Relative path -> (width, height, mode); the format follows the extension.
_GOOD = {
    "cat/a_gray.png": (20, 30, "L"),
    "cat/b_rgb.jpg": (40, 24, "RGB"),
    "cat/c_rgba.png": (24, 24, "RGBA"),
    "cat/more/g_nested.png": (16, 16, "RGB"),
    "dog/d_palette.png": (30, 20, "P"),
    "dog/e_gray.jpeg": (17, 33, "L"),
    "dog/f_upper.JPG": (16, 18, "RGB"),
}
_TRUNCATED = "cat/h_truncated.jpg"
_FAKE = "dog/i_fake.png"


def _write(root, relative, width, height, mode, seed=0):
  target = root / relative
  target.parent.mkdir(parents=True, exist_ok=True)
  _noise(seed, width, height, mode).save(target, format="JPEG" if target.suffix.lower() in (
      ".jpg", ".jpeg") else "PNG")
  return target


def _class_folder(root, bad=()):
  """`_GOOD` under `root`, plus the bad files named in `bad`, a README and hidden junk to be ignored."""
  for seed, (relative, (width, height, mode)) in enumerate(sorted(_GOOD.items())):
    _write(root, relative, width, height, mode, seed)
  if _TRUNCATED in bad:
    jpeg = _write(root, _TRUNCATED, 64, 64, "RGB", seed=99).read_bytes()
    (root / _TRUNCATED).write_bytes(jpeg[:len(jpeg) // 2])
  if _FAKE in bad:
    (root / _FAKE).write_text("this is not a PNG\n")
  (root / "README.txt").write_text("cats and dogs\n")
  (root / "dog" / "._d_palette.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
  return root


# --------------------------------------------------------------------------------------------------
# Layouts, labels and order.


@pytest.mark.parametrize("channels", [1, 3])
def test_class_folders_give_images_labels_and_sorted_order(tmp_path, channels):
  root = _class_folder(tmp_path / "pets")
  folder = image_folder.load_image_folder(root, image_size=_SIZE, channels=channels, num_threads=2)
  expected_files = tuple(sorted(_GOOD))
  assert folder.files == expected_files
  assert folder.images.shape == (len(_GOOD), _SIZE, _SIZE, channels)
  assert folder.images.dtype == np.uint8
  assert folder.class_names == ("cat", "dog")
  assert folder.ground_truth.dtype == np.int64
  np.testing.assert_array_equal(folder.ground_truth,
                                [("cat", "dog").index(f.split("/")[0]) for f in expected_files])
  assert folder.skipped == ()
  # Row i is file i: each row equals that file decoded alone.
  for i, relative in enumerate(expected_files):
    alone = image_folder.decode_image(root / relative, image_size=_SIZE, channels=channels)
    np.testing.assert_array_equal(folder.images[i], alone, err_msg=relative)
  # The rows differ (noise images), so a permutation would have been caught.
  assert len({row.tobytes() for row in folder.images}) == len(_GOOD)


def test_flat_folder_is_unlabelled(tmp_path):
  for i, name in enumerate(["b.png", "a.jpg", "c.PNG"]):
    _write(tmp_path, name, 20 + i, 18, "RGB", seed=i)
  folder = image_folder.load_image_folder(tmp_path, image_size=8)
  assert folder.ground_truth is None
  assert folder.class_names == ()
  assert folder.files == ("a.jpg", "b.png", "c.PNG")
  assert folder.images.shape == (3, 8, 8, 3)


def test_mixed_flat_and_class_layout_is_rejected(tmp_path):
  _write(tmp_path, "top.png", 8, 8, "RGB")
  _write(tmp_path, "cat/x.png", 8, 8, "RGB")
  with pytest.raises(ValueError, match="top.png.*cat/x.png"):
    image_folder.load_image_folder(tmp_path, image_size=8)


def test_split_subfolders(tmp_path):
  for split, names in {"train": ["bird/0.png", "cat/1.png", "cat/2.png", "dog/3.png"],
                       "test": ["cat/4.png", "dog/5.png", "dog/6.png"]}.items():
    for i, name in enumerate(names):
      _write(tmp_path / split, name, 12, 12, "RGB", seed=i)
  train = image_folder.load_image_folder(tmp_path, image_size=8, split="train")
  test = image_folder.load_image_folder(tmp_path, image_size=8, split="test")
  assert train.files == ("bird/0.png", "cat/1.png", "cat/2.png", "dog/3.png")
  assert test.files == ("cat/4.png", "dog/5.png", "dog/6.png")
  # The test split has no bird, yet cat and dog keep the ids they have in train.
  assert train.class_names == test.class_names == ("bird", "cat", "dog")
  np.testing.assert_array_equal(train.ground_truth, [0, 1, 1, 2])
  np.testing.assert_array_equal(test.ground_truth, [1, 2, 2])
  with pytest.raises(ValueError, match=r"split subfolders \['train', 'test'\]; pass split="):
    image_folder.load_image_folder(tmp_path, image_size=8)
  with pytest.raises(ValueError, match=r"no subfolder 'val'.*\['train', 'test'\]"):
    image_folder.load_image_folder(tmp_path, image_size=8, split="val", holdout_fraction=0.5)


def test_holdout_split_is_deterministic_disjoint_and_covering(tmp_path):
  names = [f"{'ab'[i % 2]}/{i:02d}.png" for i in range(20)]
  for i, name in enumerate(names):
    _write(tmp_path, name, 6, 6, "L", seed=i)

  def load(split, seed):
    return image_folder.load_image_folder(tmp_path, image_size=4, split=split, holdout_fraction=0.25,
                                          seed=seed)

  train, test = load("train", 3), load("test", 3)
  assert len(test.files) == 5 and len(train.files) == 15
  assert not set(train.files) & set(test.files)
  assert sorted(train.files + test.files) == sorted(names)
  assert list(train.files) == sorted(train.files) and list(test.files) == sorted(test.files)
  assert train.class_names == test.class_names == ("a", "b")
  np.testing.assert_array_equal(test.ground_truth, [("a", "b").index(f[0]) for f in test.files])
  again = load("test", 3)
  assert again.files == test.files
  np.testing.assert_array_equal(again.images, test.images)
  assert load("test", 4).files != test.files  # 5 of 20: C(20, 5) = 15504 subsets


def test_split_without_subfolder_or_holdout_names_path_split_and_subfolders(tmp_path):
  _class_folder(tmp_path)
  with pytest.raises(ValueError) as raised:
    image_folder.load_image_folder(tmp_path, image_size=8, split="train")
  message = str(raised.value)
  assert str(tmp_path) in message and "'train'" in message and "['cat', 'dog']" in message
  assert "holdout_fraction" in message


# --------------------------------------------------------------------------------------------------
# Bad files.


def test_truncated_jpeg_raises_naming_the_file(tmp_path):
  root = _class_folder(tmp_path, bad=[_TRUNCATED])
  with pytest.raises(ValueError, match=r"h_truncated\.jpg.*truncated.*on_bad='skip'"):
    image_folder.load_image_folder(root, image_size=_SIZE)


def test_text_file_named_png_raises_naming_the_file(tmp_path):
  root = _class_folder(tmp_path, bad=[_FAKE])
  with pytest.raises(ValueError, match=r"i_fake\.png.*cannot identify image file"):
    image_folder.load_image_folder(root, image_size=_SIZE)


def test_skip_mode_leaves_bad_files_out_with_one_warning(tmp_path, caplog):
  root = _class_folder(tmp_path, bad=[_TRUNCATED, _FAKE])
  caplog.set_level(logging.INFO, logger=_LOGGER)
  folder = image_folder.load_image_folder(root, image_size=_SIZE, on_bad="skip", num_threads=3)
  assert folder.images.shape[0] == len(_GOOD)
  assert folder.files == tuple(sorted(_GOOD))
  np.testing.assert_array_equal(folder.ground_truth,
                                [("cat", "dog").index(f.split("/")[0]) for f in folder.files])
  assert [name for name, _ in folder.skipped] == [_TRUNCATED, _FAKE]
  assert "truncated" in folder.skipped[0][1]
  warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1
  message = warnings[0].getMessage()
  assert _TRUNCATED in message and _FAKE in message and "Skipped 2 of 9" in message
  # The kept rows are exactly those of a clean folder.
  clean = image_folder.load_image_folder(_class_folder(tmp_path / "clean"), image_size=_SIZE)
  np.testing.assert_array_equal(folder.images, clean.images)


def test_folder_of_only_bad_files_raises(tmp_path):
  (tmp_path / "x.png").write_text("not an image")
  with pytest.raises(ValueError, match="none of its 1 image files could be decoded"):
    image_folder.load_image_folder(tmp_path, image_size=8, on_bad="skip")


# --------------------------------------------------------------------------------------------------
# Modes and geometry.


def _single(tmp_path, image, name="x.png", **kwargs):
  image.save(tmp_path / name)
  return image_folder.load_image_folder(tmp_path, image_size=kwargs.pop("image_size", _SIZE),
                                        **kwargs).images[0]


def test_grayscale_to_three_channels_replicates(tmp_path):
  gray = _noise(1, 23, 19, "L")
  rgb = _single(tmp_path, gray, channels=3)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  np.testing.assert_array_equal(rgb[..., :1], _single(tmp_path, gray, channels=1))


@pytest.mark.parametrize("mode, pixel, channels, expected", [
    ("RGBA", (10, 200, 30, 255), 3, (10, 200, 30)),  # opaque: colour unchanged, alpha dropped
    ("RGBA", (10, 200, 30, 0), 3, (10, 200, 30)),  # transparent: stored colour (documented)
    ("LA", (77, 128), 3, (77, 77, 77)),
    ("RGB", (200, 100, 50), 1, ((200 * 299 + 100 * 587 + 50 * 114 + 500) // 1000,)),
    ("L", (9,), 1, (9,)),
])
def test_uniform_pixel_conversion(tmp_path, mode, pixel, channels, expected):
  image = Image.new(mode, (_SIZE + 4, _SIZE), pixel)
  out = _single(tmp_path, image, channels=channels)
  assert out.shape == (_SIZE, _SIZE, channels)
  np.testing.assert_array_equal(out, np.broadcast_to(np.array(expected, np.uint8), out.shape))


def test_palette_with_transparency_uses_palette_colours_without_warning(tmp_path, recwarn):
  image = Image.new("P", (_SIZE, _SIZE), 1)
  image.putpalette([0, 0, 0, 12, 34, 56] + [0] * (254 * 3))
  image.info["transparency"] = bytes([255, 128] + [255] * 254)  # per-entry alphas: bytes
  out = _single(tmp_path, image, channels=3)
  np.testing.assert_array_equal(out, np.broadcast_to(np.array([12, 34, 56], np.uint8), out.shape))
  assert not [w for w in recwarn if "Transparency" in str(w.message)]


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
  image = Image.new("I;16", (_SIZE, _SIZE), 257 * 100)
  out = _single(tmp_path, image, channels=1)
  with Image.open(tmp_path / "x.png") as written:
    assert written.mode == "I;16" and np.asarray(written.convert("L")).max() == 255  # PIL clips
  np.testing.assert_array_equal(out, 100)


@pytest.mark.parametrize("width, height, resized, box", [
    (40, 24, (27, 16), (5, 0, 21, 16)),  # 40 * 16 / 24 = 26.67 -> 27; (27 - 16) // 2 = 5
    (24, 40, (16, 27), (0, 5, 16, 21)),
    (50, 16, (50, 16), (17, 0, 33, 16)),  # shorter side already S: crop only
    (10, 12, (16, 19), (0, 1, 16, 17)),  # upscaled: 12 * 16 / 10 = 19.2 -> 19
])
def test_resize_shorter_side_then_centre_crop_matches_pil(tmp_path, width, height, resized, box):
  image = _noise(7, width, height, "RGB")
  image.save(tmp_path / "x.png")
  expected = np.asarray(Image.open(tmp_path / "x.png").convert("RGB")
                        .resize(resized, Image.Resampling.BILINEAR).crop(box))
  out = image_folder.load_image_folder(tmp_path, image_size=_SIZE).images[0]
  np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------------------------------
# Bad paths and options.


def test_missing_path_raises_file_not_found(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match="nowhere"):
    image_folder.load_image_folder(missing, image_size=8)


def test_folder_without_images_names_path_and_extensions(tmp_path):
  (tmp_path / "README.txt").write_text("no images here")
  (tmp_path / "empty_class").mkdir()
  with pytest.raises(ValueError) as raised:
    image_folder.load_image_folder(tmp_path, image_size=8)
  assert str(tmp_path) in str(raised.value) and ".png" in str(raised.value)
  assert ".jpeg" in str(raised.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 0}, "image_size must be None .* or an integer > 0"),
    ({"image_size": 8, "channels": 2}, "channels must be 1 .* or 3"),
    ({"image_size": 8, "on_bad": "ignore"}, r"on_bad must be one of \('error', 'skip'\)"),
    ({"image_size": 8, "holdout_fraction": 1.5, "split": "train"}, "holdout_fraction must be"),
    ({"image_size": 8, "holdout_fraction": 0.5}, "needs split="),
    ({"image_size": 8, "num_threads": 0}, "num_threads must be"),
])
def test_bad_options_raise(tmp_path, kwargs, match):
  _write(tmp_path, "x.png", 8, 8, "RGB")
  with pytest.raises(ValueError, match=match):
    image_folder.load_image_folder(tmp_path, **kwargs)


def test_path_like_and_str_paths_agree(tmp_path):
  _class_folder(tmp_path)
  from_str = image_folder.load_image_folder(os.fspath(tmp_path), image_size=8)
  from_path = image_folder.load_image_folder(tmp_path, image_size=8)
  np.testing.assert_array_equal(from_str.images, from_path.images)


# --------------------------------------------------------------------------------------------------
# The images' own size.


def test_without_image_size_images_of_one_size_keep_it(tmp_path):
  for i in range(3):
    _write(tmp_path, f"x{i}.png", 12, 12, "RGB", seed=i)
  folder = image_folder.load_image_folder(tmp_path)
  assert folder.images.shape == (3, 12, 12, 3)
  expected = np.asarray(Image.open(tmp_path / "x1.png").convert("RGB"))
  np.testing.assert_array_equal(folder.images[1], expected)  # not resized: the pixels as stored


def test_without_image_size_one_non_square_size_gives_its_shorter_side(tmp_path):
  for i in range(2):
    _write(tmp_path, f"x{i}.png", 20, 14, "RGB", seed=i)
  assert image_folder.load_image_folder(tmp_path).images.shape == (2, 14, 14, 3)


def test_without_image_size_mixed_sizes_raise_listing_them(tmp_path):
  _write(tmp_path, "a.png", 12, 12, "RGB")
  _write(tmp_path, "b.png", 12, 12, "RGB")
  _write(tmp_path, "c.png", 30, 20, "RGB")
  with pytest.raises(image_folder.ImageSizeError, match=r"2 different sizes \(12x12 \(2 files\), "
                     r"30x20 \(1 files\)\); give image_size") as raised:
    image_folder.load_image_folder(tmp_path)
  assert raised.value.sizes == {(12, 12): 2, (30, 20): 1}


def test_without_image_size_a_bad_file_is_left_to_the_decoding_rules(tmp_path):
  _write(tmp_path, "a.png", 12, 12, "RGB")
  (tmp_path / "b.png").write_text("not a png")
  with pytest.raises(image_folder.BadImageError, match="b.png") as raised:
    image_folder.load_image_folder(tmp_path)
  assert raised.value.path.endswith("b.png")
  folder = image_folder.load_image_folder(tmp_path, on_bad="skip")
  assert folder.images.shape == (1, 12, 12, 3) and folder.files == ("a.png",)
