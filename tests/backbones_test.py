"""Tests for `selabel_tf.modeling.backbones`.

Output keys and shapes at 28 px (1 channel), 32 px and 224 px; parameter counts against the official
PyTorch networks, counted by hand below (torchvision's published totals for the ResNets); a float32
"features" output under "mixed_bfloat16"; a training step under a two-replica MirroredStrategy on the
two logical CPU devices of conftest.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from selabel_tf.modeling import backbones
from selabel_tf.modeling import heads

_FEATURES = {"alexnet_small": 4096, "alexnet": 4096, "resnet18": 512, "resnet50": 2048}
# Channels of the probe activations: conv1..conv5, pool5 (AlexNet), stem, block1..block4 (ResNet).
_CHANNELS = {
    "alexnet_small": (64, 192, 384, 256, 256, 256),
    "alexnet": (96, 256, 384, 384, 256, 256),
    "resnet18": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
}
# Their spatial size by input size. AlexNet: conv1 keeps 28/32 px (3x3/1), or 224 -> 55 (11x11/4);
# each 3/2 max-pool (after conv1, conv2 and conv5: pool5) maps n to (n - 3) // 2 + 1. ResNet: the 224 px
# stem divides by 4, the small stem by 1, each later stage by 2 (rounding up).
_ALEXNET_SIZES = {28: (28, 13, 6, 6, 6, 2), 32: (32, 15, 7, 7, 7, 3), 224: (55, 27, 13, 13, 13, 6)}
_RESNET_SIZES = {28: (28, 28, 14, 7, 4), 32: (32, 32, 16, 8, 4), 224: (56, 56, 28, 14, 7)}


def _expected_shapes(name, size):
  sizes = (_ALEXNET_SIZES if name.startswith("alexnet") else _RESNET_SIZES)[size]
  shapes = {key: (2, s, s, c)
            for key, s, c in zip(backbones.probe_layer_names(name), sizes, _CHANNELS[name])}
  shapes["features"] = (2, _FEATURES[name])
  return shapes


def _trainable_count(model):
  return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name,input_shape", [
    *[(name, shape) for name in backbones.BACKBONES for shape in ((28, 28, 1), (32, 32, 3))],
    ("alexnet_small", (224, 224, 3)),
    ("resnet18", (224, 224, 3)),
])
def test_output_keys_and_shapes(name, input_shape):
  model = backbones.build_backbone(name, input_shape)
  images = np.random.default_rng(0).uniform(-1, 1, size=(2, *input_shape)).astype(np.float32)
  outputs = model(images, training=False)
  assert set(outputs) == {*backbones.probe_layer_names(name), "features"}
  assert {key: tuple(value.shape) for key, value in outputs.items()} == _expected_shapes(name,
                                                                                       input_shape[0])
  assert outputs["features"].dtype == tf.float32
  assert np.all(np.isfinite(outputs["features"].numpy()))
  assert model.name == name


@pytest.mark.parametrize("size,conv1,pool5", [
    (16, 16, 1),  # the smallest input: stride 1
    (28, 28, 2),
    (32, 32, 3),
    (64, 32, 3),  # stride 2, kernel 5
    (96, 32, 3),  # stride 3, kernel 7
    (127, 43, 4),  # the largest small-input size
    (128, 31, 3),  # the ImageNet network from here on
    (224, 55, 6),
])
def test_alexnet_map_sizes_across_input_sizes(size, conv1, pool5):
  model = backbones.build_backbone("alexnet_small", (size, size, 3))
  assert model.output["conv1"].shape[1:3] == (conv1, conv1)
  assert model.get_layer("pool5").output.shape[1:] == (pool5, pool5, 256)  # what fc6 flattens
  assert model.get_layer("fc6").kernel.shape == (pool5 * pool5 * 256, 4096)


def test_resnet_small_variant_has_no_stem_pool():
  small = backbones.build_backbone("resnet18", (64, 64, 3))
  assert "stem_pool" not in {layer.name for layer in small.layers}
  assert small.get_layer("stem_conv").kernel_size == (3, 3)
  assert small.output["block4"].shape[1:3] == (8, 8)
  large = backbones.build_backbone("resnet18", (128, 128, 3))
  assert large.get_layer("stem_conv").kernel_size == (7, 7)
  assert large.output["block4"].shape[1:3] == (4, 4)


def test_alexnet_parameter_count_matches_official():
  # Official alexnet(size="big", bn=True) at 224 px without its top layer; BatchNorm's gamma and beta
  # are trainable, its running statistics are buffers in PyTorch and non-trainable weights in Keras.
  convs = ((11 * 11 * 3 * 96 + 96)  # conv1  34,944
           + (5 * 5 * 96 * 256 + 256)  # conv2  614,656
           + (3 * 3 * 256 * 384 + 384)  # conv3  885,120
           + (3 * 3 * 384 * 384 + 384)  # conv4  1,327,488
           + (3 * 3 * 384 * 256 + 256))  # conv5  884,992
  batch_norm = 2 * (96 + 256 + 384 + 384 + 256)  # 2,752
  fully_connected = (256 * 6 * 6 * 4096 + 4096) + (4096 * 4096 + 4096)  # 54,534,144
  assert convs + batch_norm + fully_connected == 58_284_096
  model = backbones.build_backbone("alexnet", (224, 224, 3))
  assert _trainable_count(model) == 58_284_096
  assert sum(int(np.prod(w.shape)) for w in model.non_trainable_weights) == batch_norm


def test_alexnet_small_parameter_count_matches_torchvision():
  # CFG["small"] has torchvision's AlexNet widths: its 61,100,840 parameters minus fc8 (4096 * 1000 +
  # 1000), plus 2 * (64 + 192 + 384 + 256 + 256) BatchNorm gammas and betas.
  model = backbones.build_backbone("alexnet_small", (224, 224, 3))
  assert _trainable_count(model) == 61_100_840 - 4_097_000 + 2_304


@pytest.mark.parametrize("name,expected", [
    ("resnet18", 11_689_512 - (512 * 1000 + 1000)),  # torchvision resnet18 without fc: 11,176,512
    ("resnet50", 25_557_032 - (2048 * 1000 + 1000)),  # torchvision resnet50 without fc: 23,508,032
])
def test_resnet_parameter_count_matches_torchvision(name, expected):
  model = backbones.build_backbone(name, (224, 224, 3))
  assert _trainable_count(model) == expected


def test_conv_init_is_he_fan_out():
  model = backbones.build_backbone("resnet50", (32, 32, 3))
  kernel = model.get_layer("block3_unit1_2_conv").kernel.numpy()  # 3x3, 256 -> 256
  assert kernel.std() == pytest.approx(np.sqrt(2.0 / (3 * 3 * 256)), rel=0.02)
  assert not model.losses  # weight decay belongs to the optimizer


@pytest.mark.usefixtures("mixed_bfloat16")
@pytest.mark.parametrize("name", ["alexnet_small", "resnet18"])
def test_mixed_bfloat16_features_are_float32(name):
  model = backbones.build_backbone(name, (32, 32, 3))
  outputs = model(np.ones((2, 32, 32, 3), np.float32), training=False)
  assert outputs["features"].dtype == tf.float32
  assert outputs[backbones.probe_layer_names(name)[-1]].dtype == tf.bfloat16
  assert all(w.dtype == "float32" for w in model.weights)


def test_trains_under_mirrored_strategy(mirrored_strategy):
  assert len(tf.config.list_logical_devices("CPU")) >= 2, "conftest.py should create 2 CPU devices"
  strategy = mirrored_strategy
  with strategy.scope():
    backbone = backbones.build_backbone("alexnet_small", (28, 28, 1))
    logits = heads.MultiHead("8x2")(backbone.output["features"])
    model = keras.Model(backbone.input, logits)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True)] * 2)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(8, 28, 28, 1)).astype(np.float32)
  labels = [rng.integers(0, 8, size=8), rng.integers(0, 8, size=8)]
  before = model.get_layer("conv1_conv").kernel.numpy()
  history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
  assert np.isfinite(history.history["loss"][0])
  kernel = model.get_layer("conv1_conv").kernel.value  # the tf.distribute variable
  replicas = strategy.experimental_local_results(kernel)
  assert len(replicas) == 2
  np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())
  assert not np.array_equal(before, replicas[0].numpy())


@pytest.mark.parametrize("name,probes", [
    ("alexnet", ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")),
    ("alexnet_small", ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")),
    ("resnet18", ("stem", "block1", "block2", "block3", "block4")),
    ("resnet50", ("stem", "block1", "block2", "block3", "block4")),
])
def test_probe_layer_names(name, probes):
  assert backbones.probe_layer_names(name) == probes


@pytest.mark.parametrize("name,embedding", [
    ("alexnet", "pool5"), ("alexnet_small", "pool5"), ("resnet18", "features"), ("resnet50", "features")])
def test_embedding_layer(name, embedding):
  assert backbones.embedding_layer(name) == embedding


def test_pool5_is_the_input_of_fc6():
  """pool5 is the conv trunk's output: fc6 (dropout off) applied to it flattened gives fc6's output."""
  model = backbones.build_backbone("alexnet_small", (28, 28, 1))
  images = np.random.default_rng(0).uniform(-1, 1, size=(3, 28, 28, 1)).astype(np.float32)
  pool5 = model(images, training=False)["pool5"].numpy()
  fc6_in = keras.Model(model.input, model.get_layer("flatten").output)(images, training=False).numpy()
  np.testing.assert_array_equal(pool5.reshape(3, -1), fc6_in)


@pytest.mark.parametrize("name,input_shape,match", [
    ("vgg16", (32, 32, 3), r"backbone name must be one of .*'vgg16'"),
    ("resnet18", (32, 32), r"input_shape must be \(height, width, channels\).*\(32, 32\)"),
    ("resnet18", (32, 32, 4), r"channels in \(1, 3\), got \(32, 32, 4\)"),
    ("resnet18", (None, 32, 3), r"positive ints"),
    ("alexnet", (8, 8, 1), r"at least 16x16 pixels.*got 8x8"),
])
def test_bad_arguments(name, input_shape, match):
  with pytest.raises(ValueError, match=match):
    backbones.build_backbone(name, input_shape)


def test_probe_layer_names_rejects_unknown_name():
  with pytest.raises(ValueError, match=r"backbone name must be one of"):
    backbones.probe_layer_names("alexnet_big")
  with pytest.raises(ValueError, match=r"backbone name must be one of"):
    backbones.embedding_layer("alexnet_big")


def _fc_layers(model):
  return [layer.name for layer in model.layers if layer.name.startswith(("fc6", "fc7"))]


def test_fc_batchnorm_normalises_fc6_and_fc7_before_their_relu():
  keras.utils.set_random_seed(0)
  model = backbones.build_backbone("alexnet_small", (28, 28, 1), fc_batchnorm=True)
  assert _fc_layers(model) == ["fc6_dropout", "fc6", "fc6_bn", "fc6_relu",
                               "fc7_dropout", "fc7", "fc7_bn", "fc7_relu"]
  assert "fc6_bn" not in _fc_layers(backbones.build_backbone("alexnet_small", (28, 28, 1)))
  # 2 x 4096 (gamma, beta) more trainable weights than the official network; nothing else changes.
  plain = backbones.build_backbone("alexnet_small", (28, 28, 1))
  assert _trainable_count(model) - _trainable_count(plain) == 2 * 2 * 4096
  # In training mode fc7's pre-activations are the batch-standardised fc7 outputs (numpy float64).
  images = np.random.default_rng(0).normal(size=(64, 28, 28, 1)).astype(np.float32)
  probe = keras.Model(model.input, [model.get_layer("fc7").output, model.get_layer("fc7_bn").output])
  fc7, normalised = (np.asarray(v, np.float64) for v in probe(images, training=True))
  expected = (fc7 - fc7.mean(0)) / np.sqrt(fc7.var(0) + 1e-5)
  np.testing.assert_allclose(normalised, expected, atol=2e-3)
  assert np.abs(normalised.std(0) - 1).max() < 0.01


def _dropout_rates(model):
  return {layer.name: layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)}


def test_fc_dropout_sets_the_rate_of_both_fc_dropouts_and_nothing_else():
  keras.utils.set_random_seed(0)
  official = backbones.build_backbone("alexnet_small", (28, 28, 1), fc_batchnorm=True)
  keras.utils.set_random_seed(0)
  off = backbones.build_backbone("alexnet_small", (28, 28, 1), fc_batchnorm=True, fc_dropout=0.0)
  assert _dropout_rates(official) == {"fc6_dropout": 0.5, "fc7_dropout": 0.5}
  assert _dropout_rates(off) == {"fc6_dropout": 0.0, "fc7_dropout": 0.0}
  # The same layers and weight shapes (a rate-0 Dropout draws no seed, so the fc initial values differ).
  assert [layer.name for layer in off.layers] == [layer.name for layer in official.layers]
  assert [w.shape for w in off.weights] == [w.shape for w in official.weights]
  off.set_weights(official.get_weights())
  # With the same weights the two agree where no dropout acts (inference); in training mode the
  # official network's fc7 changes from call to call (dropout), at rate 0 it does not.
  images = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype(np.float32)
  np.testing.assert_allclose(off(images)["features"], official(images)["features"], rtol=1e-6, atol=1e-6)
  first, second = (np.asarray(off(images, training=True)["features"]) for _ in range(2))
  np.testing.assert_array_equal(first, second)
  dropped = [np.asarray(official(images, training=True)["features"]) for _ in range(2)]
  assert not np.array_equal(*dropped)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_fc_dropout_outside_0_1_is_refused(rate):
  with pytest.raises(ValueError, match=rf"fc_dropout must be in \[0, 1\), got {rate}"):
    backbones.build_backbone("alexnet_small", (28, 28, 1), fc_dropout=rate)


def test_fc_dropout_is_refused_for_a_resnet():
  with pytest.raises(ValueError, match="fc_dropout applies to the AlexNet backbones.*'resnet18'"):
    backbones.build_backbone("resnet18", (32, 32, 3), fc_dropout=0.0)
  backbones.build_backbone("resnet18", (32, 32, 3), fc_dropout=backbones.ALEXNET_DROPOUT)  # the default


def test_fc_batchnorm_is_refused_for_a_resnet():
  with pytest.raises(ValueError, match="fc_batchnorm applies to the AlexNet backbones.*'resnet18'"):
    backbones.build_backbone("resnet18", (32, 32, 3), fc_batchnorm=True)
