"""Tests for `selabel_tf.modeling.heads`: the heads spec and the `MultiHead` layer."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from selabel_tf.modeling import heads


@pytest.mark.parametrize("spec,expected", [
    ("3000x10", (3000,) * 10),
    ("128,256,512", (128, 256, 512)),
    ("128", (128,)),
    ("1x1", (1,)),
    (" 3000 x 10 ", (3000,) * 10),
    ("128, 256 ,512", (128, 256, 512)),
    ("10X3", (10, 10, 10)),
])
def test_parse_heads(spec, expected):
  assert heads.parse_heads(spec) == expected


@pytest.mark.parametrize("spec,reason", [
    ("x10", r"K, the clusters per head, is missing"),
    ("3000x", r"T, the number of heads, is missing"),
    ("0x2", r"K, the clusters per head, is 0"),
    ("3000x0", r"T, the number of heads, is 0"),
    ("128,,4", r"a cluster count is missing"),
    ("128,", r"a cluster count is missing"),
    ("", r"a cluster count is missing"),
    ("abc", r"a cluster count is 'abc', not a whole number"),
    ("-5", r"a cluster count is '-5', not a whole number"),
    ("12 8", r"a cluster count is '12 8', not a whole number"),
    ("2.5", r"a cluster count is '2.5', not a whole number"),
    ("10x3x2", r"more than one 'x'"),
    ("10x3,4", r"T, the number of heads, is '3,4', not a whole number"),
])
def test_parse_heads_rejects_malformed_specs(spec, reason):
  with pytest.raises(ValueError) as error:
    heads.parse_heads(spec)
  message = str(error.value)
  assert message.startswith(f"heads spec {spec!r} is malformed (")
  assert re.search(reason, message), message
  assert "use KxT (e.g. 3000x10" in message and "comma list of cluster counts" in message


def test_parse_heads_rejects_non_strings():
  with pytest.raises(TypeError, match=r"heads spec must be a string .* got 128 of type int"):
    heads.parse_heads(128)


def test_multi_head_outputs():
  layer = heads.MultiHead((5, 7, 7), name="heads")
  features = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
  logits = layer(features)
  assert [tuple(x.shape) for x in logits] == [(3, 5), (3, 7), (3, 7)]
  assert all(x.dtype == tf.float32 for x in logits)
  assert [head.name for head in layer.heads] == ["head_0", "head_1", "head_2"]
  assert layer.num_heads == 3
  assert layer.compute_output_shape((None, 16)) == [(None, 5), (None, 7), (None, 7)]
  # Official init: N(0, 0.01^2) kernels and zero biases; heads of equal size start different.
  assert not np.array_equal(layer.heads[1].kernel.numpy(), layer.heads[2].kernel.numpy())
  kernels = np.concatenate([head.kernel.numpy().ravel() for head in layer.heads])
  assert kernels.std() == pytest.approx(0.01, rel=0.2)
  assert all(not np.any(head.bias.numpy()) for head in layer.heads)


def test_multi_head_accepts_a_spec():
  assert heads.MultiHead("4x3").num_clusters == (4, 4, 4)
  assert heads.MultiHead([np.int64(4), 5]).num_clusters == (4, 5)


@pytest.mark.parametrize("num_clusters", [(), (4, 0), (4, 2.5), 4, (True,)])
def test_multi_head_rejects_bad_cluster_counts(num_clusters):
  with pytest.raises(ValueError, match=r"num_clusters must be a non-empty sequence of ints >= 1"):
    heads.MultiHead(num_clusters)


def test_seeded_initializer_differs_per_head():
  layer = heads.MultiHead("3x2", kernel_initializer=keras.initializers.GlorotUniform(seed=1))
  layer.build((None, 8))
  assert not np.array_equal(layer.heads[0].kernel.numpy(), layer.heads[1].kernel.numpy())
  again = heads.MultiHead("3x2", kernel_initializer=keras.initializers.GlorotUniform(seed=1))
  again.build((None, 8))
  np.testing.assert_array_equal(layer.heads[1].kernel.numpy(), again.heads[1].kernel.numpy())


def test_get_config_round_trip():
  layer = heads.MultiHead((5, 7), kernel_initializer="he_normal", name="clusters")
  layer.build((None, 16))
  config = layer.get_config()
  restored = heads.MultiHead.from_config(config)
  assert restored.get_config() == config
  assert restored.num_clusters == (5, 7) and restored.name == "clusters"
  restored.build((None, 16))
  restored.set_weights(layer.get_weights())
  features = np.random.default_rng(1).normal(size=(2, 16)).astype(np.float32)
  for expected, actual in zip(layer(features), restored(features)):
    np.testing.assert_array_equal(expected.numpy(), actual.numpy())


def test_saved_model_file_round_trip(tmp_path):
  inputs = keras.Input((16,))
  model = keras.Model(inputs, heads.MultiHead("6x2", name="heads")(inputs))
  path = str(tmp_path / "heads.keras")
  model.save(path)
  loaded = keras.saving.load_model(path)
  features = np.random.default_rng(2).normal(size=(4, 16)).astype(np.float32)
  for expected, actual in zip(model(features), loaded(features)):
    np.testing.assert_array_equal(expected.numpy(), actual.numpy())


@pytest.mark.usefixtures("mixed_bfloat16")
def test_float32_under_mixed_bfloat16():
  inputs = keras.Input((16,))
  hidden = keras.layers.Dense(16, name="trunk")(inputs)  # computes in bfloat16
  layer = heads.MultiHead("300x2")
  model = keras.Model(inputs, layer(hidden))
  assert model.get_layer("trunk").compute_dtype == "bfloat16"
  assert layer.compute_dtype == "float32"
  assert all(head.compute_dtype == "float32" for head in layer.heads)
  logits = model(np.ones((2, 16), np.float32))
  assert all(x.dtype == tf.float32 for x in logits)
  restored = heads.MultiHead.from_config(layer.get_config())
  assert restored.compute_dtype == "float32"
