"""The paper's backbones, AlexNet with BatchNorm and ResNet-18/50, as functional Keras 3 models.

`build_backbone(name, input_shape)` returns a `keras.Model` from images float [B, H, W, C] (C = 1 or 3)
to a dict of activations: one per linear probe (`probe_layer_names(name)`) and "features", the vector
the clustering heads read.

| name            | probe keys (activations)                | "features"                                 |
|-----------------|-----------------------------------------|--------------------------------------------|
| "alexnet_small" | conv1 .. conv5 (after BN, ReLU), pool5  | float32 [B, 4096]: fc7 after ReLU          |
| "alexnet"       | conv1 .. conv5 (after BN, ReLU), pool5  | float32 [B, 4096]: fc7 after ReLU          |
| "resnet18"      | stem, block1 .. block4                  | float32 [B, 512]: global average of block4 |
| "resnet50"      | stem, block1 .. block4                  | float32 [B, 2048]                          |

AlexNet's conv probes read each conv layer after its ReLU and before any max-pool, where the official
`eval_linear_probes.py` attaches them; "pool5" is conv5's max-pool, the input of fc6: the output of
the conv trunk. ResNet's "stem" is the input of block1 (after the max-pool in the ImageNet stem) and
"blockN" the output of stage N.

`embedding_layer(name)` names the backbone's image representation, the conv trunk's output: "pool5" for
AlexNet, "features" (the global average of block4, what the heads read) for ResNet. The kNN evaluation
reads it and the export names it. AlexNet's fc6/fc7 belong with the heads: trained to predict the
self-labels, they keep less of the trunk's neighbourhoods than pool5 does (README "Quality").

The input size picks the variant, from the shorter side S = min(H, W):

* S >= `IMAGENET_MIN_SIZE` (128): the ImageNet networks, as in the official code
  (github.com/yukimasano/self-label, models/alexnet.py; models/resnetv1.py, i.e. torchvision's
  ResNets). "alexnet" is its CFG["big"] (channels 96-256-384-384-256, the network of the paper's
  AlexNet results), "alexnet_small" its CFG["small"] (64-192-384-256-256). Conv1 11x11/4 pad 2,
  max-pool 3/2, conv2 5x5 pad 2, max-pool 3/2, conv3-5 3x3 pad 1, max-pool 3/2: 6x6x256 at 224 px.
  Every conv keeps its bias and is followed by BatchNorm and ReLU, as the official; the trunk is
  Dropout(0.5), fc6 (4096), ReLU, Dropout(0.5), fc7 (4096), ReLU, with no BatchNorm
  (`fc_batchnorm=True` adds one before each of the two ReLUs; `fc_dropout` sets the rate of the two
  dropouts). ResNet: conv
  7x7/2, BN, ReLU, max-pool 3/2, four stages (the stride-2 of a bottleneck on its 3x3 conv, as
  torchvision), block4 7x7 at 224 px.
* `MIN_INPUT_SIZE` (16) <= S < 128: small-input variants for CIFAR/MNIST-sized images (64 and 96 px
  work too). The official CIFAR script instead upsamples 32 px images to 224 px, which costs ~50x the
  compute. ResNet uses the usual CIFAR stem, conv 3x3/1 + BN + ReLU and no max-pool (block4 4x4 at
  32 px). AlexNet keeps every layer but conv1, which gets stride s = max(1, S // 32), kernel 2s + 1 and
  padding s, so that its map is ceil(S / s) px: S itself below 64 px, 32-48 px above. The three 3/2
  max-pools then leave the pooled conv5 map at 3x3 for 32, 64 and 96 px and 2x2 for 28 px
  (conv1 32 -> pool1 15 -> pool2 7 -> pool5 3; 28 -> 13 -> 6 -> 2). fc6 reads that flattened map
  (2304 inputs at 32 px instead of 9216) and the trunk keeps 4096 units, the feature size of the
  official CIFAR experiments (`knn_dim = 4096`).

Padding follows PyTorch: Keras' "same" pads a stride-2 layer asymmetrically (the extra row at the
bottom) where PyTorch pads both sides equally, so every padded layer is an explicit ZeroPadding2D
followed by a "valid" op, and feature-map sizes match the PyTorch networks at every input size. The
padded max-pool of the ResNet stem follows a ReLU, so its zero padding acts as PyTorch's -inf.

Initialisation as the official code and torchvision: convs N(0, 2 / (k * k * out_channels)) (He,
fan-out), AlexNet's fc layers N(0, 0.01^2) with zero bias, BatchNorm gamma 1 and beta 0; BatchNorm
momentum 0.9 and epsilon 1e-5 are PyTorch's momentum 0.1 and eps 1e-5. No layer has a regulariser:
weight decay is the optimizer's. Initialisers are unseeded, so `keras.utils.set_random_seed` makes a
build reproducible.

Mixed precision: under a "mixed_bfloat16" (or "mixed_float16") policy the layers compute in the low
precision with float32 variables. "features" comes out of a float32 layer, so heads, kNN and stored
features see float32; the probe activations stay in the compute dtype, since they are large (conv1 at
224 px is 55x55x96 per image) and each probe pools them before its own float32 layers. The models hold
no per-device state: build them inside `strategy.scope()` to mirror or shard their variables.
"""

import numbers
from typing import Dict, Sequence, Tuple

import keras

BACKBONES = ("alexnet_small", "alexnet", "resnet18", "resnet50")
PROBE_LAYERS = {
    "alexnet": ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5"),
    "resnet": ("stem", "block1", "block2", "block3", "block4"),
}
FEATURES = "features"  # the vector the heads read
EMBEDDING_LAYERS = {"alexnet": "pool5", "resnet": FEATURES}
IMAGENET_MIN_SIZE = 128  # shorter side from which the ImageNet variant is built
MIN_INPUT_SIZE = 16  # the small AlexNet's conv5 map is 1x1 at 16 px
CHANNELS = (1, 3)

_ALEXNET_WIDTHS = {
    "alexnet_small": (64, 192, 384, 256, 256),  # official CFG["small"]
    "alexnet": (96, 256, 384, 384, 256),  # official CFG["big"]
}
_ALEXNET_POOLED = ("conv1", "conv2", "conv5")  # a 3/2 max-pool follows these
_ALEXNET_FC_UNITS = 4096
ALEXNET_DROPOUT = 0.5  # the official AlexNet's, before fc6 and fc7
_RESNET_UNITS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}
_RESNET_BOTTLENECK = {"resnet18": False, "resnet50": True}
_BOTTLENECK_EXPANSION = 4
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def probe_layer_names(name: str) -> Tuple[str, ...]:
  """The keys of the probe activations in `build_backbone(name, ...)`'s outputs, shallowest first.

  Raises:
    ValueError: if `name` is not one of `BACKBONES`.
  """
  _check_name(name)
  return PROBE_LAYERS[_family(name)]


def embedding_layer(name: str) -> str:
  """The key of backbone `name`'s image representation (the conv trunk's output): "pool5" for AlexNet,
  "features" for ResNet. The kNN evaluation reads it by default and the export names it.

  Raises:
    ValueError: if `name` is not one of `BACKBONES`.
  """
  _check_name(name)
  return EMBEDDING_LAYERS[_family(name)]


def _family(name):
  return "alexnet" if name.startswith("alexnet") else "resnet"


def input_variant(input_shape: Sequence[int]) -> str:
  """Returns "imagenet" if the shorter side of `input_shape` (H, W, C) is >= 128 px, else "small"."""
  return "imagenet" if min(input_shape[0], input_shape[1]) >= IMAGENET_MIN_SIZE else "small"


def has_fc_trunk(name: str) -> bool:
  """Whether backbone `name` has AlexNet's fc6/fc7 trunk (where `fc_batchnorm` applies)."""
  return name.startswith("alexnet")


def build_backbone(name: str, input_shape: Sequence[int], fc_batchnorm: bool = False,
                   fc_dropout: float = ALEXNET_DROPOUT) -> keras.Model:
  """Builds a backbone (see the module docstring for the architectures).

  Args:
    name: one of `BACKBONES`: "alexnet_small", "alexnet", "resnet18", "resnet50".
    input_shape: (H, W, C) of the images, C in `CHANNELS`; the shorter side picks the ImageNet
      (>= 128 px) or the small-input (16-127 px) variant.
    fc_batchnorm: AlexNet: a BatchNorm between fc6 (and fc7) and its ReLU, like the conv layers' (the
      official AlexNet has none there). ResNets have no fc trunk: True is refused.
    fc_dropout: AlexNet: the rate of the Dropout before fc6 and before fc7, in [0, 1) (the official
      0.5; at 0 the layers stay and pass their input through). ResNets have no fc trunk: a rate other
      than the official is refused.

  Returns:
    A functional `keras.Model` named `name`, from images float [B, H, W, C] to a dict: one activation
    [B, h, w, c] per key of `probe_layer_names(name)` (in the compute dtype) and "features", float32
    [B, D] with D = 4096 (AlexNet), 512 (ResNet-18) or 2048 (ResNet-50).

  Raises:
    ValueError: on an unknown `name`, an `input_shape` that is not (H, W, C) with C in {1, 3} and
      H, W >= `MIN_INPUT_SIZE`, or an `fc_dropout` outside [0, 1).
  """
  _check_name(name)
  if fc_batchnorm and not has_fc_trunk(name):
    raise ValueError(f"fc_batchnorm applies to the AlexNet backbones (their fc6/fc7 trunk); {name!r} "
                     f"has none")
  if not 0 <= fc_dropout < 1:
    raise ValueError(f"fc_dropout must be in [0, 1), got {fc_dropout!r}")
  if fc_dropout != ALEXNET_DROPOUT and not has_fc_trunk(name):
    raise ValueError(f"fc_dropout applies to the AlexNet backbones (their fc6/fc7 trunk); {name!r} "
                     f"has none")
  input_shape = _check_input_shape(input_shape)
  imagenet = input_variant(input_shape) == "imagenet"
  images = keras.Input(shape=input_shape, name="images")
  if name.startswith("alexnet"):
    outputs = _alexnet(images, _ALEXNET_WIDTHS[name], imagenet, fc_batchnorm, fc_dropout)
  else:
    outputs = _resnet(images, _RESNET_UNITS[name], _RESNET_BOTTLENECK[name], imagenet)
  return keras.Model(images, outputs, name=name)


def _check_name(name):
  if name not in BACKBONES:
    raise ValueError(f"backbone name must be one of {BACKBONES}, got {name!r}")


def _check_input_shape(input_shape):
  shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
  if (len(shape) != 3 or shape[2] not in CHANNELS
      or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape)):
    raise ValueError(f"input_shape must be (height, width, channels) of positive ints with channels in "
                     f"{CHANNELS}, got {input_shape!r}")
  if min(shape[:2]) < MIN_INPUT_SIZE:
    raise ValueError(f"input_shape {shape}: images must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} "
                     f"pixels (upsample smaller ones), got {shape[0]}x{shape[1]}")
  return tuple(int(d) for d in shape)


# --------------------------------------------------------------------------------------------------
# Layers.


def _conv_initializer():
  # A fresh unseeded instance per layer: a reused instance would give every layer the same values.
  return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


def _conv_bn(x, filters, kernel, stride, padding, name, use_bias=False, relu=True):
  """[ZeroPadding2D] -> Conv2D -> BatchNorm [-> ReLU]: layers {name}_pad, _conv, _bn, _relu."""
  if padding:
    x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
  x = keras.layers.Conv2D(filters, kernel, strides=stride, use_bias=use_bias,
                          kernel_initializer=_conv_initializer(), name=f"{name}_conv")(x)
  # synchronized: under MirroredStrategy the statistics cover the global batch, as on one device.
  x = keras.layers.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, synchronized=True,
                                      name=f"{name}_bn")(x)
  if relu:
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
  return x


# --------------------------------------------------------------------------------------------------
# AlexNet.


def _alexnet(images, widths, imagenet, fc_batchnorm, fc_dropout) -> Dict[str, keras.KerasTensor]:
  """Layers conv{i}_{pad,conv,bn,relu}, pool{i}, flatten, fc{6,7}_{dropout,[bn,]relu}, fc6, fc7, features;
  outputs conv1..conv5, pool5 (the last max-pool's output) and features."""
  if imagenet:
    conv1 = (11, 4, 2)  # (kernel, stride, padding)
  else:
    stride = max(1, min(images.shape[1:3]) // 32)
    conv1 = (2 * stride + 1, stride, stride)
  layout = (conv1, (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1))
  x, outputs = images, {}
  for i, (width, (kernel, stride, padding)) in enumerate(zip(widths, layout), start=1):
    name = f"conv{i}"
    x = _conv_bn(x, width, kernel, stride, padding, name, use_bias=True)
    outputs[name] = x
    if name in _ALEXNET_POOLED:
      x = keras.layers.MaxPooling2D(3, strides=2, name=f"pool{i}")(x)
  outputs["pool5"] = x
  # Keras flattens (h, w, c) where PyTorch flattens (c, h, w): a permutation of fc6's rows.
  x = keras.layers.Flatten(name="flatten")(x)
  for name in ("fc6", "fc7"):
    x = keras.layers.Dropout(fc_dropout, name=f"{name}_dropout")(x)
    x = keras.layers.Dense(_ALEXNET_FC_UNITS, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                           name=name)(x)
    if fc_batchnorm:
      x = keras.layers.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, synchronized=True,
                                          name=f"{name}_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
  outputs[FEATURES] = keras.layers.Activation("linear", dtype="float32", name=FEATURES)(x)
  return outputs


# --------------------------------------------------------------------------------------------------
# ResNet.


def _resnet(images, units, bottleneck, imagenet) -> Dict[str, keras.KerasTensor]:
  """Layers stem_*, block{stage}_unit{u}_*, features (global average pool, float32)."""
  if imagenet:
    x = _conv_bn(images, 64, 7, 2, 3, "stem")
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
  else:
    x = _conv_bn(images, 64, 3, 1, 1, "stem")
  outputs = {"stem": x}
  unit = _bottleneck_unit if bottleneck else _basic_unit
  for stage, num_units in enumerate(units, start=1):
    width = 64 * 2 ** (stage - 1)
    for u in range(1, num_units + 1):
      x = unit(x, width, 2 if stage > 1 and u == 1 else 1, f"block{stage}_unit{u}")
    outputs[f"block{stage}"] = x
  # Averaged in float32: the input is cast up before the sum.
  outputs[FEATURES] = keras.layers.GlobalAveragePooling2D(dtype="float32", name=FEATURES)(x)
  return outputs


def _basic_unit(x, width, stride, name):
  """torchvision's BasicBlock: 3x3 (stride) -> 3x3, plus the shortcut."""
  shortcut = _shortcut(x, width, stride, name)
  y = _conv_bn(x, width, 3, stride, 1, f"{name}_1")
  y = _conv_bn(y, width, 3, 1, 1, f"{name}_2", relu=False)
  return _merge(shortcut, y, name)


def _bottleneck_unit(x, width, stride, name):
  """torchvision's Bottleneck (ResNet v1.5): 1x1 -> 3x3 (stride) -> 1x1 (4 * width), plus the shortcut."""
  out_width = _BOTTLENECK_EXPANSION * width
  shortcut = _shortcut(x, out_width, stride, name)
  y = _conv_bn(x, width, 1, 1, 0, f"{name}_1")
  y = _conv_bn(y, width, 3, stride, 1, f"{name}_2")
  y = _conv_bn(y, out_width, 1, 1, 0, f"{name}_3", relu=False)
  return _merge(shortcut, y, name)


def _shortcut(x, out_width, stride, name):
  """Identity, or a 1x1 conv + BN where the unit changes the resolution or the width."""
  if stride == 1 and x.shape[-1] == out_width:
    return x
  return _conv_bn(x, out_width, 1, stride, 0, f"{name}_shortcut", relu=False)


def _merge(shortcut, residual, name):
  x = keras.layers.Add(name=f"{name}_add")([shortcut, residual])
  return keras.layers.ReLU(name=f"{name}_out")(x)
