"""Image augmentations of SeLa (the official PyTorch code's torchvision transforms), batched in TF.

Training ("paper" strength), in this order:

    RandomResizedCrop(image_size, scale=crop_scale, ratio=(3/4, 4/3))   bilinear
    ColorJitter(0.4, 0.4, 0.4, 0.4)                                    ops in a random order per example
    RandomGrayscale(p=0.2)
    RandomHorizontalFlip()
    ToTensor(), Normalize(mean, std)

Evaluation (strength "none"): Resize(resize_size) (shorter side), CenterCrop(image_size), Normalize.
"weak": RandomResizedCrop with scale (0.5, 1) and the flip only.

Two halves, so that an example's augmentation depends only on (seed, epoch or pass, index) and not on
the batching, shuffling or sharding around it:

* `sample_params(index, seed, height, width, config)`: the random parameters of ONE example, from
  stateless random numbers keyed by fold_in(seed, index). Scalar work, for a `tf.data` map before
  batching.
* `apply_batch(images, params, config)`: the pixels of a whole batch at once: crop, resize and flip
  as one separable bilinear gather with per-example coordinates, the colour jitter with per-example
  factors by broadcasting, the grayscale by `tf.where`, then normalisation. No per-example Python.

    def params(index):
      return index, sample_params(index, tf.random.experimental.stateless_fold_in(seed, epoch),
                                  height, width, config)
    ds = indices.map(params).batch(batch_size)
    ds = ds.map(lambda index, p: (index, apply_batch(tf.gather(images, index), p, config)))

Differences from torchvision (on PIL images, as the official code runs it):

* Training crops are resized bilinearly without antialiasing; torchvision antialiases when it shrinks
  a crop. Crops of small datasets are enlarged, where the two agree; an
  ImageNet crop of an image stored at 256 px shrinks by at most 256/224. The evaluation resize is
  antialiased, like PIL's.
* Pixel arithmetic is float32 on [0, 1], as torchvision's tensor path (`F.adjust_*` on float tensors):
  PIL rounds to uint8 after every jitter op, rounds the contrast mean to an integer and shifts hue in
  steps of 1/255 of a turn.
* Random numbers come from TF's stateless Philox generator, not torch's: same distributions, other
  draws.
* Grayscale comes after the jitter, as in the official CIFAR script and in the issue; the official
  ImageNet script applies RandomGrayscale before ColorJitter.
* One-channel images get no saturation or hue jitter and no random grayscale (torchvision's
  `adjust_saturation`, `adjust_hue` and `RandomGrayscale` leave one channel unchanged): their
  parameters are fixed at saturation 1, hue 0, grayscale False.
"""

import dataclasses
import math
from typing import Dict, Optional, Tuple, Union

import tensorflow as tf

STRENGTHS = ("none", "weak", "paper")
DATASET_KINDS = ("small", "imagenet")
# torchvision's ImageNet evaluation resizes the shorter side to image_size / 0.875 (224 -> 256).
IMAGENET_CROP_FRACTION = 0.875

# Per-channel (mean, std) of the training images in [0, 1]. CIFAR-10's std is the per-pixel std over
# the whole training set; the official SeLa CIFAR script uses (0.2023, 0.1994, 0.2010), the mean of
# per-image stds, which is common in CIFAR code but not the std of the data.
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
}

# Defaults of the random fields per strength ("none" uses none of them).
_PRESETS = {
    "none": {"crop_scale": (1.0, 1.0), "jitter": (0.0, 0.0, 0.0, 0.0), "grayscale_prob": 0.0},
    "weak": {"crop_scale": (0.5, 1.0), "jitter": (0.0, 0.0, 0.0, 0.0), "grayscale_prob": 0.0},
    "paper": {"crop_scale": (0.08, 1.0), "jitter": (0.4, 0.4, 0.4, 0.4), "grayscale_prob": 0.2},
}
_SMALL_PAPER_CROP_SCALE = (0.2, 1.0)  # the official CIFAR script
# Jitter ops, as numbered in `params["jitter_order"]` (torchvision ColorJitter's fn_idx).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
# Layout of the uniform draws of one example. Fixed whatever the config, so that changing one
# transform's settings leaves the others' draws alone. Ten crop attempts, as torchvision.
_AREA = slice(0, 10)
_LOG_RATIO = slice(10, 20)
_CROP_Y = slice(20, 30)
_CROP_X = slice(30, 40)
_JITTER = slice(40, 44)  # brightness, contrast, saturation, hue
_ORDER = slice(44, 48)
_GRAYSCALE, _FLIP = 48, 49
_NUM_DRAWS = 50
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale and tf.image.rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
_RNG = "philox"  # explicit: "auto_select" may pick another generator on another device


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """What `sample_params`, `apply_batch` and `evaluation_batch` do.

  Fields left at None take the default of `strength` (see `_PRESETS`): "paper" crops with scale
  (0.08, 1), jitters by 0.4 and grays with p=0.2; "weak" crops with scale (0.5, 1) and neither jitters
  nor grays; "none" is the evaluation transform and ignores every random field. Explicit values win
  over the preset.

  Attributes:
    image_size: S, side of the square output.
    resize_size: the evaluation transform's shorter side before the centre crop (>= image_size);
      None for image_size. `config_for` sets round(S / 0.875) for ImageNet.
    strength: one of `STRENGTHS`.
    crop_scale: (min, max) fraction of the image area of a random crop, 0 < min <= max <= 1.
    crop_ratio: (min, max) width / height of a random crop, 0 < min <= max.
    jitter: (brightness, contrast, saturation, hue), or one number for all four. Factors are drawn
      uniformly from [max(0, 1 - v), 1 + v], the hue shift from [-v, v] turns (v <= 0.5). With one
      channel, saturation and hue become 0.
    grayscale_prob: probability of converting an example to grayscale (3 channels only).
    flip: flip horizontally with probability 0.5.
    mean: per-channel mean subtracted after the transform (values in [0, 1]); None for 0.
    std: per-channel std divided by; None for 1.
    channels: C of the input and output, 1 or 3.
  """
  image_size: int
  resize_size: Optional[int] = None
  strength: str = "paper"
  crop_scale: Optional[Tuple[float, float]] = None
  crop_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  jitter: Union[None, float, Tuple[float, float, float, float]] = None
  grayscale_prob: Optional[float] = None
  flip: bool = True
  mean: Optional[Tuple[float, ...]] = None
  std: Optional[Tuple[float, ...]] = None
  channels: int = 3

  def __post_init__(self):
    if self.strength not in STRENGTHS:
      raise ValueError(f"strength must be one of {STRENGTHS}, got {self.strength!r}")
    if not _is_int(self.image_size) or self.image_size < 1:
      raise ValueError(f"image_size must be an integer > 0, got {self.image_size!r}")
    if self.channels not in (1, 3) or isinstance(self.channels, bool):
      raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
    preset = _PRESETS[self.strength]
    set_field = lambda name, value: object.__setattr__(self, name, value)
    resize_size = self.image_size if self.resize_size is None else self.resize_size
    if not _is_int(resize_size) or resize_size < self.image_size:
      raise ValueError(f"resize_size must be an integer >= image_size={self.image_size}, "
                       f"got {self.resize_size!r}")
    set_field("resize_size", int(resize_size))
    set_field("image_size", int(self.image_size))
    crop_scale = _float_pair("crop_scale", preset["crop_scale"] if self.crop_scale is None
                             else self.crop_scale)
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
      raise ValueError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {self.crop_scale!r}")
    set_field("crop_scale", crop_scale)
    crop_ratio = _float_pair("crop_ratio", self.crop_ratio)
    if not 0 < crop_ratio[0] <= crop_ratio[1]:
      raise ValueError(f"crop_ratio must be (min, max) with 0 < min <= max, got {self.crop_ratio!r}")
    set_field("crop_ratio", crop_ratio)
    set_field("jitter", self._checked_jitter(preset["jitter"] if self.jitter is None else self.jitter))
    grayscale_prob = preset["grayscale_prob"] if self.grayscale_prob is None else self.grayscale_prob
    if not (isinstance(grayscale_prob, (int, float)) and 0 <= grayscale_prob <= 1):
      raise ValueError(f"grayscale_prob must be in [0, 1], got {self.grayscale_prob!r}")
    set_field("grayscale_prob", float(grayscale_prob) if self.channels == 3 else 0.0)
    if not isinstance(self.flip, bool):
      raise ValueError(f"flip must be True or False, got {self.flip!r}")
    set_field("mean", self._checked_stats("mean", self.mean))
    set_field("std", self._checked_stats("std", self.std))
    if self.std is not None and min(self.std) <= 0:
      raise ValueError(f"std must be > 0 per channel, got {self.std!r}")

  def _checked_jitter(self, jitter):
    if isinstance(jitter, (int, float)) and not isinstance(jitter, bool):
      jitter = (jitter,) * 4
    try:
      jitter = tuple(float(v) for v in jitter)
    except (TypeError, ValueError):
      jitter = None
    if jitter is None or len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
      raise ValueError(f"jitter must be a number or (brightness, contrast, saturation, hue), each >= 0 "
                       f"and hue <= 0.5, got {self.jitter!r}")
    if self.channels == 1:
      jitter = jitter[:2] + (0.0, 0.0)
    return jitter

  def _checked_stats(self, name, values):
    if values is None:
      return None
    try:
      values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
      values = ()
    if len(values) != self.channels:
      raise ValueError(f"{name} must have one value per channel ({self.channels}), got {values!r}")
    return values

  @property
  def is_random(self) -> bool:
    """Whether `apply_batch` uses the random parameters (strength is not "none")."""
    return self.strength != "none"


def config_for(dataset_kind: str,
               image_size: int,
               channels: int,
               mean: Optional[Tuple[float, ...]],
               std: Optional[Tuple[float, ...]],
               strength: str = "paper") -> AugmentConfig:
  """The official code's settings for a kind of dataset.

  Args:
    dataset_kind: "small" (CIFAR-like: crop scale (0.2, 1), evaluation without resizing) or
      "imagenet" (crop scale (0.08, 1), evaluation resize to round(image_size / 0.875)).
    image_size: S, side of the output.
    channels: 1 or 3.
    mean, std: per-channel normalisation, e.g. `*NORMALIZATION["cifar10"]`; None to skip.
    strength: one of `STRENGTHS`. The dataset kind's crop scale applies to "paper" only.

  Returns:
    An `AugmentConfig`.

  Raises:
    ValueError: on an unknown `dataset_kind`, or any invalid field (see `AugmentConfig`).
  """
  if dataset_kind not in DATASET_KINDS:
    raise ValueError(f"dataset_kind must be one of {DATASET_KINDS}, got {dataset_kind!r}")
  if dataset_kind == "imagenet":
    resize_size, paper_scale = None, None
    if _is_int(image_size):
      resize_size = int(round(image_size / IMAGENET_CROP_FRACTION))
  else:
    resize_size, paper_scale = image_size, _SMALL_PAPER_CROP_SCALE
  return AugmentConfig(image_size=image_size, resize_size=resize_size, strength=strength,
                       crop_scale=paper_scale if strength == "paper" else None, mean=mean, std=std,
                       channels=channels)


def epoch_seed(seed, epoch) -> tf.Tensor:
  """The seed of one epoch or labelling pass: int64 [2], `seed` with `epoch` folded in.

  Args:
    seed: an int, or an int [2] seed tensor.
    epoch: int scalar (Python or tensor).
  """
  return tf.random.experimental.stateless_fold_in(_as_seed(seed), tf.cast(epoch, tf.int64), alg=_RNG)


def sample_params(index, seed, image_height, image_width, config: AugmentConfig) -> Dict[str, tf.Tensor]:
  """The random augmentation parameters of one example.

  A deterministic function of (seed, index) and the config: the random numbers are 50 stateless
  uniforms keyed by fold_in(seed, index), in a fixed layout. Fold the epoch or pass into `seed`
  (`epoch_seed`) so that every epoch differs. Graph-safe and cheap: call it in a `tf.data` map
  before batching; the dict batches to the `params` of `apply_batch`.

  Args:
    index: int scalar, the example's index in the dataset.
    seed: int [2] tensor (or an int), the seed of this epoch or pass.
    image_height, image_width: int scalars (Python or tensor), H and W of the input image.
    config: an `AugmentConfig`.

  Returns:
    A dict of tensors:
      crop_y, crop_x, crop_height, crop_width: int32 [], the crop in input pixels
        (torchvision RandomResizedCrop.get_params: i, j, h, w); the whole image for strength "none".
      brightness, contrast, saturation: float32 [], jitter factors (1 means unchanged).
      hue: float32 [], hue shift in turns (0 means unchanged).
      jitter_order: int32 [4], the order of the ops `BRIGHTNESS`, `CONTRAST`, `SATURATION`, `HUE`.
      grayscale: bool [], convert to grayscale.
      flip: bool [], flip horizontally.
  """
  height = tf.cast(image_height, tf.int32)
  width = tf.cast(image_width, tf.int32)
  if not config.is_random:
    one, zero = tf.constant(1.0), tf.constant(0.0)
    no = tf.constant(False)
    return {"crop_y": tf.constant(0), "crop_x": tf.constant(0), "crop_height": height,
            "crop_width": width, "brightness": one, "contrast": one, "saturation": one, "hue": zero,
            "jitter_order": tf.range(4, dtype=tf.int32), "grayscale": no, "flip": no}
  key = tf.random.experimental.stateless_fold_in(_as_seed(seed), tf.cast(index, tf.int64), alg=_RNG)
  draws = tf.random.stateless_uniform([_NUM_DRAWS], seed=key, alg=_RNG)
  params = _sample_crop(draws, height, width, config.crop_scale, config.crop_ratio)
  jitter = draws[_JITTER]
  for name, k in (("brightness", 0), ("contrast", 1), ("saturation", 2)):
    low, high = max(0.0, 1.0 - config.jitter[k]), 1.0 + config.jitter[k]
    params[name] = low + jitter[k] * (high - low)
  params["hue"] = config.jitter[3] * (2.0 * jitter[3] - 1.0)
  params["jitter_order"] = tf.argsort(draws[_ORDER])  # int32, a uniform permutation
  params["grayscale"] = draws[_GRAYSCALE] < config.grayscale_prob
  params["flip"] = tf.logical_and(draws[_FLIP] < 0.5, config.flip)
  return params


def _sample_crop(draws, height, width, scale, ratio):
  """torchvision RandomResizedCrop.get_params, with all 10 attempts drawn at once."""
  height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  target_area = height_f * width_f * (scale[0] + draws[_AREA] * (scale[1] - scale[0]))
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_low + draws[_LOG_RATIO] * (log_high - log_low))
  # tf.round and Python's round both round half to even.
  crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # the first attempt that fits
  h, w = crop_h[first], crop_w[first]
  # torch.randint(0, n + 1): floor(u * (n + 1)), kept <= n against float rounding.
  y = tf.minimum(tf.cast(draws[_CROP_Y][first] * tf.cast(height - h + 1, tf.float32), tf.int32),
                 height - h)
  x = tf.minimum(tf.cast(draws[_CROP_X][first] * tf.cast(width - w + 1, tf.float32), tf.int32),
                 width - w)
  # No attempt fits: the centre crop of the image, its aspect ratio clamped to the range.
  in_ratio = width_f / height_f
  too_tall, too_wide = in_ratio < ratio[0], in_ratio > ratio[1]
  fallback_w = tf.where(too_wide, tf.cast(tf.round(height_f * ratio[1]), tf.int32), width)
  fallback_h = tf.where(too_tall, tf.cast(tf.round(width_f / ratio[0]), tf.int32), height)
  found = tf.reduce_any(fits)
  h, w = tf.where(found, h, fallback_h), tf.where(found, w, fallback_w)
  return {"crop_y": tf.where(found, y, (height - fallback_h) // 2),
          "crop_x": tf.where(found, x, (width - fallback_w) // 2),
          "crop_height": h, "crop_width": w}


def apply_batch(images, params: Dict[str, tf.Tensor], config: AugmentConfig, *,
                normalize: bool = True) -> tf.Tensor:
  """Augments a batch with its examples' parameters, vectorised over the batch.

  Graph-safe (a `tf.data` map after batching, or a `tf.function`), TF ops only. With strength "none"
  it is `evaluation_batch` and ignores `params`.

  Args:
    images: uint8 [B, H, W, C] (or float32 in [0, 1]), C = config.channels.
    params: `sample_params` of each example, batched: each entry [B] (jitter_order [B, 4]).
    config: an `AugmentConfig`.
    normalize: apply (x - mean) / std; False returns values in [0, 1].

  Returns:
    float32 [B, S, S, C], S = config.image_size.
  """
  images = _check_images(images, config)
  if not config.is_random:
    return evaluation_batch(images, config, normalize=normalize)
  x = _crop_resize_flip(images, params, config.image_size)
  if any(config.jitter):
    x = _color_jitter(x, params, use_hue=config.channels == 3 and config.jitter[3] > 0)
  if config.channels == 3 and config.grayscale_prob > 0:
    x = tf.where(params["grayscale"][:, None, None, None], _grayscale(x), x)
  return _finish(x, config, normalize)


def evaluation_batch(images, config: AugmentConfig, *, normalize: bool = True) -> tf.Tensor:
  """The evaluation transform: torchvision Resize(resize_size) then CenterCrop(image_size).

  Resize: the shorter side becomes resize_size, the longer floor(resize_size * long / short),
  bilinear with antialiasing (as PIL). Centre crop: offset round((resized - S) / 2), half to even.

  Args:
    images: uint8 [B, H, W, C] (or float32 in [0, 1]).
    config: an `AugmentConfig` (its random fields are ignored).
    normalize: apply (x - mean) / std; False returns values in [0, 1].

  Returns:
    float32 [B, S, S, C].
  """
  images = _check_images(images, config)
  size = config.image_size
  height, width = images.shape[1], images.shape[2]
  if height is not None and width is not None:
    new_h, new_w = _resized_shape(height, width, config.resize_size)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
  else:
    shape = tf.shape(images)
    new_h, new_w = _resized_shape_tensor(shape[1], shape[2], config.resize_size)
    half = lambda n: tf.cast(tf.round(tf.cast(n - size, tf.float32) / 2), tf.int32)
    top, left = half(new_h), half(new_w)
  x = tf.cast(images, tf.float32)
  if height is None or width is None or (new_h, new_w) != (height, width):
    x = tf.image.resize(x, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
  x = x[:, top:top + size, left:left + size, :]
  x = tf.ensure_shape(x, [None, size, size, config.channels])
  if images.dtype == tf.uint8:
    x = x * (1.0 / 255.0)
  return _finish(x, config, normalize)


def _resized_shape(height, width, size):
  """torchvision Resize(size) of an H x W image: (new H, new W)."""
  if height <= width:
    return size, size * width // height
  return size * height // width, size


def _resized_shape_tensor(height, width, size):
  shorter_is_height = height <= width
  return (tf.where(shorter_is_height, size, size * height // width),
          tf.where(shorter_is_height, size * width // height, size))


def _crop_resize_flip(images, params, size):
  """Each example's crop, resized to [S, S] bilinearly and flipped where asked: float32 in [0, 1].

  Exactly tf.image.resize(crop, [S, S], antialias=False) (torchvision's resized_crop without
  antialiasing): output pixel k samples the crop at (k + 0.5) h / S - 0.5, clamped to the crop, so
  the border repeats the crop's edge and never blends in pixels outside it (crop_and_resize cannot
  clamp per crop: it would). Separable: a gather of two rows per output row, then of two columns. A
  flip reverses the column coordinates, at no cost.
  """
  y0, x0 = tf.cast(params["crop_y"], tf.float32), tf.cast(params["crop_x"], tf.float32)
  h, w = tf.cast(params["crop_height"], tf.float32), tf.cast(params["crop_width"], tf.float32)
  centres = (tf.range(size, dtype=tf.float32) + 0.5) / size  # [S]
  ys = _sample_coordinates(y0, h, centres)  # [B, S]
  xs = _sample_coordinates(x0, w, centres)
  xs = tf.where(tf.cast(params["flip"], tf.bool)[:, None], tf.reverse(xs, axis=[1]), xs)
  rows = _interpolate(images, ys, axis=1)  # [B, S, W, C]
  crops = _interpolate(rows, xs, axis=2)  # [B, S, S, C]
  return crops * (1.0 / 255.0) if images.dtype == tf.uint8 else crops


def _sample_coordinates(start, length, centres):
  """Pixel coordinates [B, S] at which each example's crop [start, start + length) is sampled."""
  coordinates = start[:, None] + centres[None, :] * length[:, None] - 0.5
  return tf.clip_by_value(coordinates, start[:, None], (start + length - 1.0)[:, None])


def _interpolate(x, coordinates, axis):
  """Linear interpolation of x [B, ...] along `axis` at per-example coordinates [B, S]: float32."""
  lower = tf.floor(coordinates)
  fraction = coordinates - lower
  lower = tf.cast(lower, tf.int32)
  upper = tf.minimum(lower + 1, tf.shape(x)[axis] - 1)
  below = tf.cast(tf.gather(x, lower, axis=axis, batch_dims=1), tf.float32)
  above = tf.cast(tf.gather(x, upper, axis=axis, batch_dims=1), tf.float32)
  shape = [-1, 1, 1, 1]
  shape[axis] = tf.shape(coordinates)[1]
  return below + (above - below) * tf.reshape(fraction, shape)


def _color_jitter(x, params, use_hue):
  """torchvision ColorJitter with per-example factors and a per-example random order.

  Brightness, contrast and saturation are each a blend clip(f x + (1 - f) target, 0, 1) with target
  0, the mean of the grayscale image, or the grayscale image: one vectorised stage applies, per
  example, whichever of the three comes next in its order. The (costly) hue rotation runs once; the
  linear ops an example places before it run in three stages before, the rest in three stages after.
  """
  order = tf.cast(params["jitter_order"], tf.int32)  # [B, 4]
  is_hue = tf.equal(order, HUE)
  # The three linear ops in each example's order: positions of non-hue entries, kept in order.
  linear_positions = tf.argsort(tf.cast(is_hue, tf.int32), axis=1, stable=True)[:, :3]
  linear = tf.gather(order, linear_positions, batch_dims=1)  # [B, 3]
  factors = tf.stack([params["brightness"], params["contrast"], params["saturation"]], axis=1)
  if not use_hue:
    for t in range(3):
      x = _linear_stage(x, linear[:, t], factors, None)
    return x
  hue_position = tf.argmax(tf.cast(is_hue, tf.int32), axis=1, output_type=tf.int32)  # [B]
  for t in range(3):
    x = _linear_stage(x, linear[:, t], factors, t < hue_position)
  x = _adjust_hue(x, params["hue"])
  for t in range(3):
    x = _linear_stage(x, linear[:, t], factors, t >= hue_position)
  return x


def _linear_stage(x, op, factors, active):
  """Per example, brightness, contrast or saturation (`op` [B]) by its factor; identity if not active."""
  factor = tf.gather(factors, op, batch_dims=1)  # [B]
  if active is not None:
    factor = tf.where(active, factor, 1.0)
  factor = factor[:, None, None, None]
  gray = _grayscale(x)  # [B, S, S, 1]
  mean = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
  is_contrast = tf.cast(tf.equal(op, CONTRAST), x.dtype)[:, None, None, None]
  is_saturation = tf.cast(tf.equal(op, SATURATION), x.dtype)[:, None, None, None]
  target = is_contrast * mean + is_saturation * gray  # brightness blends with black
  return tf.clip_by_value(factor * x + (1.0 - factor) * target, 0.0, 1.0)


def _adjust_hue(x, shift):
  """torchvision adjust_hue: H <- (H + shift) mod 1 in HSV, per example."""
  hsv = tf.image.rgb_to_hsv(x)
  hue = tf.math.floormod(hsv[..., 0] + shift[:, None, None], 1.0)
  return tf.image.hsv_to_rgb(tf.concat([hue[..., None], hsv[..., 1:]], axis=-1))


def _grayscale(x):
  """float [..., C] -> [..., 1]: luma of RGB; one channel is its own grayscale."""
  if x.shape[-1] == 1:
    return x
  red, green, blue = _LUMA
  return red * x[..., 0:1] + green * x[..., 1:2] + blue * x[..., 2:3]  # faster than a reduce_sum


def _finish(x, config, normalize):
  x = tf.clip_by_value(x, 0.0, 1.0)
  if normalize and config.mean is not None:
    x = x - tf.constant(config.mean, tf.float32)
  if normalize and config.std is not None:
    x = x * tf.constant([1.0 / s for s in config.std], tf.float32)
  return x


def _check_images(images, config):
  images = tf.convert_to_tensor(images)
  if images.shape.rank != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if images.shape[-1] is not None and images.shape[-1] != config.channels:
    raise ValueError(f"images have {images.shape[-1]} channels but config.channels is {config.channels}")
  if images.dtype not in (tf.uint8, tf.float32):
    raise ValueError(f"images must be uint8 (0..255) or float32 (0..1), got {images.dtype.name}")
  return images


def _as_seed(seed):
  if isinstance(seed, int):
    return tf.constant([seed, 0], tf.int64)
  seed = tf.cast(seed, tf.int64)
  if seed.shape.rank is not None and seed.shape != [2]:
    raise ValueError(f"seed must be an int or an int [2] tensor, got shape {seed.shape}")
  return seed


def _is_int(value):
  return isinstance(value, int) and not isinstance(value, bool)


def _float_pair(name, value):
  try:
    pair = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    pair = ()
  if len(pair) != 2:
    raise ValueError(f"{name} must be a pair (min, max), got {value!r}")
  return pair
