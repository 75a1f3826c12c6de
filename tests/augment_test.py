"""Tests for `selabel_tf.data.augment`: SeLa's torchvision augmentations, batched in TensorFlow.

References are independent of the code under test: PIL for the evaluation resize and crop,
`tf.image.resize` of the sliced crop for the training crop, a per-example numpy/colorsys transcription
of torchvision's ColorJitter (in each example's order), a numpy transcription of torchvision's
RandomResizedCrop.get_params for the crop distribution, and the Fashion-MNIST files for its
normalisation constants.
"""

import colorsys
import gzip
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import stats

from selabel_tf.data import augment

_SEED = augment.epoch_seed(1234, 0)


def _params(indices, height, width, config, seed=_SEED):
  """Batched `sample_params` of `indices`, through a tf.data map (graph mode) as a pipeline runs it."""
  indices = tf.constant(indices, tf.int64)
  ds = tf.data.Dataset.from_tensor_slices(indices).map(
      lambda i: augment.sample_params(i, seed, height, width, config))
  return ds.batch(len(indices)).get_single_element()


def _numpy(params):
  return {k: v.numpy() for k, v in params.items()}


def _images(num, height, width, channels, seed=0):
  """uint8 [num, H, W, C]: smooth colour gradients plus noise, so that crops, hue and flips show."""
  rng = np.random.default_rng(seed)
  y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
  base = np.stack([y, x, 1 - x * y], axis=-1)[..., :channels]
  images = 255 * (0.7 * base[None] + 0.3 * rng.random((num, height, width, channels)))
  return np.round(images).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Shapes, ranges, normalisation.


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("strength", augment.STRENGTHS)
def test_output_shape_dtype_and_range(channels, strength):
  config = augment.config_for("small", 24, channels, (0.5,) * channels, (0.25,) * channels,
                              strength=strength)
  images = _images(6, 30, 36, channels)
  params = _params(range(6), 30, 36, config)
  raw = augment.apply_batch(images, params, config, normalize=False)
  normalized = augment.apply_batch(images, params, config)
  assert raw.shape == (6, 24, 24, channels) and raw.dtype == tf.float32
  assert normalized.shape == (6, 24, 24, channels) and normalized.dtype == tf.float32
  raw = raw.numpy()
  assert raw.min() >= 0.0 and raw.max() <= 1.0
  np.testing.assert_allclose(normalized.numpy(), (raw - 0.5) / 0.25, atol=1e-5)


def test_pipeline_in_graph_mode_and_float_input():
  config = augment.config_for("small", 16, 3, *augment.NORMALIZATION["cifar10"])
  images = _images(5, 20, 20, 3)
  params = _params(range(5), 20, 20, config)
  apply = tf.function(lambda x, p: augment.apply_batch(x, p, config))
  expected = augment.apply_batch(images, params, config).numpy()
  np.testing.assert_allclose(apply(images, params).numpy(), expected, atol=1e-5)
  as_float = augment.apply_batch(images.astype(np.float32) / 255, params, config).numpy()
  np.testing.assert_allclose(as_float, expected, atol=1e-4)


def test_strength_none_is_the_evaluation_transform():
  config = augment.config_for("imagenet", 16, 3, None, None, strength="none")
  images = _images(3, 21, 25, 3)
  params = _numpy(_params(range(3), 21, 25, config))
  assert not params["flip"].any() and not params["grayscale"].any()
  np.testing.assert_array_equal(params["crop_height"], 21)
  np.testing.assert_array_equal(
      augment.apply_batch(images, params, config).numpy(), augment.evaluation_batch(images, config).numpy())


# --------------------------------------------------------------------------------------------------
# Determinism.


def _augment_all(images, config, order, batch_size, seed=_SEED):
  """{index: augmented image} from a pipeline visiting `order` in batches of `batch_size`."""
  height, width = images.shape[1:3]
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(order, tf.int64))
  ds = ds.map(lambda i: (i, augment.sample_params(i, seed, height, width, config)))
  ds = ds.batch(batch_size).map(
      lambda i, p: (i, augment.apply_batch(tf.gather(images, i), p, config)))
  return {int(i): image for index, batch in ds.as_numpy_iterator() for i, image in zip(index, batch)}


def test_same_seed_and_index_give_the_same_image_whatever_the_batching():
  config = augment.config_for("small", 20, 3, *augment.NORMALIZATION["cifar10"])
  images = tf.constant(_images(11, 24, 24, 3))
  in_order = _augment_all(images, config, np.arange(11), batch_size=4)
  shuffled = _augment_all(images, config, np.random.default_rng(5).permutation(11), batch_size=3)
  again = _augment_all(images, config, np.arange(11), batch_size=4)
  for i in range(11):
    np.testing.assert_array_equal(again[i], in_order[i])
    np.testing.assert_allclose(shuffled[i], in_order[i], atol=1e-6)


def test_params_depend_on_seed_index_and_epoch():
  config = augment.config_for("imagenet", 32, 3, None, None)
  first = _numpy(_params([0, 1, 2, 3], 48, 40, config))
  repeat = _numpy(_params([3, 2, 1, 0], 48, 40, config))
  other_epoch = _numpy(_params([0, 1, 2, 3], 48, 40, config, seed=augment.epoch_seed(1234, 1)))
  for name, values in first.items():
    np.testing.assert_array_equal(repeat[name][::-1], values)
  # Continuous draws differ between any two examples, and between epochs.
  assert len(set(first["brightness"].tolist())) == 4
  assert not np.any(first["hue"] == other_epoch["hue"])


# --------------------------------------------------------------------------------------------------
# Evaluation transform against PIL.


@pytest.mark.parametrize("kind,size,height,width,channels", [
    ("imagenet", 24, 40, 53, 3),  # shrink: shorter side 40 -> 27, longer 53 -> 35, crop offsets 2 and 6
    ("imagenet", 16, 31, 12, 1),  # enlarge a tall one-channel image: 12 -> 18, 31 -> 46
    ("small", 20, 20, 27, 3),  # no resize, centre crop only
])
def test_evaluation_matches_pil_resize_and_centre_crop(kind, size, height, width, channels):
  config = augment.config_for(kind, size, channels, None, None)
  images = _images(3, height, width, channels)
  result = augment.evaluation_batch(images, config).numpy()
  resize = config.resize_size
  new_w, new_h = (resize, resize * height // width) if width <= height else (resize * width // height, resize)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  for image, out in zip(images, result):
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    pil = pil.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + size, top + size))
    reference = np.asarray(pil, np.float32).reshape(size, size, channels) / 255
    # PIL rounds its output to uint8, and its fixed-point weights differ slightly.
    np.testing.assert_allclose(out, reference, atol=1.5 / 255)


def test_evaluation_with_unknown_spatial_shape():
  config = augment.config_for("imagenet", 16, 3, *augment.NORMALIZATION["imagenet"])
  images = _images(2, 23, 30, 3)
  dynamic = tf.function(lambda x: augment.evaluation_batch(x, config),
                        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
  np.testing.assert_allclose(dynamic(images).numpy(), augment.evaluation_batch(images, config).numpy(),
                             atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Random resized crop.


def test_crop_is_bilinear_resize_of_the_crop_and_flip_mirrors_it():
  config = augment.AugmentConfig(image_size=16, strength="weak", crop_scale=(0.05, 1.0))
  images = _images(12, 25, 31, 3)
  params = _numpy(_params(range(12), 25, 31, config))
  result = augment.apply_batch(images, params, config).numpy()
  assert 0 < params["flip"].sum() < 12
  for image, out, y, x, h, w, flip in zip(images, result, params["crop_y"], params["crop_x"],
                                          params["crop_height"], params["crop_width"], params["flip"]):
    crop = image[y:y + h, x:x + w].astype(np.float32) / 255
    reference = tf.image.resize(crop, [16, 16], method="bilinear", antialias=False).numpy()
    np.testing.assert_allclose(out, reference[:, ::-1] if flip else reference, atol=1e-4)


def _reference_crop_params(rng, num, height, width, scale, ratio):
  """torchvision RandomResizedCrop.get_params, in numpy: (h, w) of `num` crops."""
  area = height * width
  out = np.zeros((num, 2), int)
  pending = np.ones(num, bool)
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1], num)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), num))
    w = np.round(np.sqrt(target * aspect)).astype(int)
    h = np.round(np.sqrt(target / aspect)).astype(int)
    take = pending & (0 < w) & (w <= width) & (0 < h) & (h <= height)
    out[take] = np.stack([h, w], axis=1)[take]
    pending &= ~take
  assert not pending.any()  # the fallback is tested on its own
  return out


@pytest.mark.parametrize("kind,height,width", [("imagenet", 256, 256), ("small", 96, 120)])
def test_crop_distribution_matches_torchvision(kind, height, width):
  config = augment.config_for(kind, 32, 3, None, None)
  scale, (low, high) = config.crop_scale, config.crop_ratio
  p = _numpy(_params(range(2000), height, width, config))
  y, x, h, w = p["crop_y"], p["crop_x"], p["crop_height"], p["crop_width"]
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
  # h and w are rounded: the sampled area and ratio lie within half a pixel of the result.
  area = height * width
  assert ((h + 0.5) * (w + 0.5) >= scale[0] * area).all() and ((h - 0.5) * (w - 0.5) <= area).all()
  assert ((w + 0.5) / (h - 0.5) >= low).all() and ((w - 0.5) / (h + 0.5) <= high).all()
  reference = _reference_crop_params(np.random.default_rng(0), 100_000, height, width, scale, (low, high))
  fraction, reference_fraction = h * w / area, reference[:, 0] * reference[:, 1] / area
  assert abs(fraction.mean() - reference_fraction.mean()) < 4 * reference_fraction.std() / np.sqrt(2000)
  assert stats.ks_2samp(fraction, reference_fraction).pvalue > 1e-3
  assert stats.ks_2samp(np.log(w / h), np.log(reference[:, 1] / reference[:, 0])).pvalue > 1e-3


@pytest.mark.parametrize("height,width,expected", [
    (20, 400, (0, 186, 20, 27)),  # too wide: full height, width round(20 * 4/3), centred
    (400, 20, (186, 0, 27, 20)),  # too tall: full width, height round(20 / (3/4))
])
def test_crop_falls_back_to_a_centre_crop_clamped_to_the_ratio(height, width, expected):
  # Every attempt is taller (wider) than the image: its area is >= 0.08 * H * W.
  config = augment.config_for("imagenet", 16, 3, None, None)
  p = _numpy(_params(range(20), height, width, config))
  for name, value in zip(("crop_y", "crop_x", "crop_height", "crop_width"), expected):
    np.testing.assert_array_equal(p[name], value)


# --------------------------------------------------------------------------------------------------
# Colour jitter, grayscale, flip.


def test_flip_grayscale_and_jitter_frequencies():
  config = augment.config_for("small", 32, 3, None, None)
  p = _numpy(_params(range(2000), 32, 32, config))
  # 5 binomial standard deviations.
  assert abs(p["flip"].mean() - 0.5) < 5 * np.sqrt(0.25 / 2000)
  assert abs(p["grayscale"].mean() - 0.2) < 5 * np.sqrt(0.16 / 2000)
  for name in ("brightness", "contrast", "saturation"):
    assert p[name].min() >= 0.6 and p[name].max() <= 1.4
    assert abs(p[name].mean() - 1.0) < 5 * 0.8 / np.sqrt(12 * 2000)
  assert p["hue"].min() >= -0.4 and p["hue"].max() <= 0.4
  np.testing.assert_array_equal(np.sort(p["jitter_order"], axis=1), np.tile(np.arange(4), (2000, 1)))
  # Each op comes first about a quarter of the time: the order is a uniform permutation.
  first = np.bincount(p["jitter_order"][:, 0], minlength=4) / 2000
  assert np.all(np.abs(first - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 2000))


def test_weak_strength_only_crops_and_flips():
  config = augment.config_for("small", 32, 3, None, None, strength="weak")
  assert config.crop_scale == (0.5, 1.0) and config.jitter == (0.0,) * 4 and config.grayscale_prob == 0
  p = _numpy(_params(range(200), 32, 32, config))
  np.testing.assert_array_equal(p["brightness"], 1.0)
  np.testing.assert_array_equal(p["saturation"], 1.0)
  np.testing.assert_array_equal(p["hue"], 0.0)
  assert not p["grayscale"].any() and 0 < p["flip"].mean() < 1
  assert (p["crop_height"] * p["crop_width"] >= 0.45 * 32 * 32).all()


def _gray(x):
  return x @ np.array([0.2989, 0.587, 0.114]) if x.shape[-1] == 3 else x[..., 0]


def _reference_augment(image, p, i):
  """torchvision ColorJitter (ops in p's order), RandomGrayscale, flip of one float64 [H, W, C] image."""
  x = image.astype(np.float64) / 255
  for op in p["jitter_order"][i]:
    if op == augment.BRIGHTNESS:
      x = np.clip(p["brightness"][i] * x, 0, 1)
    elif op == augment.CONTRAST:
      c = p["contrast"][i]
      x = np.clip(c * x + (1 - c) * _gray(x).mean(), 0, 1)
    elif op == augment.SATURATION and x.shape[-1] == 3:
      s = p["saturation"][i]
      x = np.clip(s * x + (1 - s) * _gray(x)[..., None], 0, 1)
    elif op == augment.HUE and x.shape[-1] == 3:
      hsv = np.array([colorsys.rgb_to_hsv(*rgb) for rgb in x.reshape(-1, 3)])
      hsv[:, 0] = np.mod(hsv[:, 0] + p["hue"][i], 1.0)
      x = np.array([colorsys.hsv_to_rgb(*v) for v in hsv]).reshape(x.shape)
  if p["grayscale"][i]:
    x = np.repeat(_gray(x)[..., None], x.shape[-1], axis=-1)
  return x[:, ::-1] if p["flip"][i] else x


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_grayscale_and_flip_match_torchvision_per_example(channels):
  # A crop of the whole image at its own size isolates the colour ops.
  config = augment.AugmentConfig(image_size=12, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                 grayscale_prob=0.5, channels=channels)
  images = _images(24, 12, 12, channels, seed=3)
  p = _numpy(_params(range(24), 12, 12, config))
  result = augment.apply_batch(images, p, config, normalize=False).numpy()
  if channels == 3:
    hue_position = np.argmax(p["jitter_order"] == augment.HUE, axis=1)
    assert len(set(hue_position.tolist())) == 4 and 0 < p["grayscale"].sum() < 24
  for i in range(24):
    np.testing.assert_allclose(result[i], _reference_augment(images[i], p, i), atol=1e-4,
                               err_msg=f"example {i}, order {p['jitter_order'][i]}")


def test_grayscale_examples_have_equal_channels():
  config = augment.config_for("small", 16, 3, None, None)
  images = _images(40, 20, 20, 3)
  p = _numpy(_params(range(40), 20, 20, config))
  result = augment.apply_batch(images, p, config, normalize=False).numpy()
  spread = result.max(axis=-1) - result.min(axis=-1)  # [B, S, S]
  gray = p["grayscale"]
  assert 0 < gray.sum() < 40
  assert spread[gray].max() < 1e-6
  assert (spread[~gray].max(axis=(1, 2)) > 0.05).all()


def test_one_channel_has_no_saturation_hue_or_grayscale():
  config = augment.config_for("small", 28, 1, *augment.NORMALIZATION["fashion_mnist"])
  assert config.jitter == (0.4, 0.4, 0.0, 0.0) and config.grayscale_prob == 0
  p = _numpy(_params(range(500), 28, 28, config))
  np.testing.assert_array_equal(p["saturation"], 1.0)
  np.testing.assert_array_equal(p["hue"], 0.0)
  assert not p["grayscale"].any()
  assert p["brightness"].std() > 0.1 and p["contrast"].std() > 0.1
  assert augment.apply_batch(_images(4, 28, 28, 1), _params(range(4), 28, 28, config),
                             config).shape == (4, 28, 28, 1)


# --------------------------------------------------------------------------------------------------
# Configuration.


def test_config_for_sets_the_official_parameters():
  imagenet = augment.config_for("imagenet", 224, 3, *augment.NORMALIZATION["imagenet"])
  assert imagenet.resize_size == 256 and imagenet.crop_scale == (0.08, 1.0)
  assert imagenet.jitter == (0.4,) * 4 and imagenet.grayscale_prob == 0.2 and imagenet.flip
  small = augment.config_for("small", 32, 3, *augment.NORMALIZATION["cifar10"])
  assert small.resize_size == 32 and small.crop_scale == (0.2, 1.0)
  assert small.crop_ratio == pytest.approx((3 / 4, 4 / 3))


@pytest.mark.parametrize("kwargs,message", [
    ({"strength": "strong"}, r"strength must be one of \('none', 'weak', 'paper'\), got 'strong'"),
    ({"channels": 2}, "channels must be 1 or 3, got 2"),
    ({"image_size": 0}, "image_size must be an integer > 0, got 0"),
    ({"resize_size": 16}, "resize_size must be an integer >= image_size=32, got 16"),
    ({"crop_scale": (0.5, 0.2)}, "crop_scale"),
    ({"jitter": (0.4, 0.4, 0.4, 0.6)}, "hue <= 0.5"),
    ({"grayscale_prob": 1.5}, "grayscale_prob must be in"),
    ({"mean": (0.5,)}, r"mean must have one value per channel \(3\)"),
    ({"std": (0.2, 0.0, 0.2)}, "std must be > 0"),
])
def test_invalid_config_raises_naming_the_value(kwargs, message):
  with pytest.raises(ValueError, match=message):
    augment.AugmentConfig(**{"image_size": 32, **kwargs})


def test_invalid_dataset_kind_and_channel_mismatch_raise():
  with pytest.raises(ValueError, match=r"dataset_kind must be one of \('small', 'imagenet'\), got 'huge'"):
    augment.config_for("huge", 32, 3, None, None)
  with pytest.raises(ValueError, match="strength must be one of .*got 'strong'"):
    augment.config_for("small", 32, 3, None, None, strength="strong")
  config = augment.config_for("small", 8, 3, None, None)
  with pytest.raises(ValueError, match="images have 1 channels but config.channels is 3"):
    augment.evaluation_batch(np.zeros((2, 8, 8, 1), np.uint8), config)


def test_normalization_constants():
  for name, (mean, std) in augment.NORMALIZATION.items():
    assert len(mean) == len(std) in (1, 3), name
    assert all(0 < v < 1 for v in mean + std), name
  path = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
  assert os.path.exists(path), f"{path} is missing: run ./install.sh (it installs dataset-fashion-mnist)"
  with gzip.open(path, "rb") as f:
    pixels = np.frombuffer(f.read(), np.uint8, offset=16) / 255
  (mean,), (std,) = augment.NORMALIZATION["fashion_mnist"]
  assert pixels.mean() == pytest.approx(mean, abs=5e-5) and pixels.std() == pytest.approx(std, abs=5e-5)
