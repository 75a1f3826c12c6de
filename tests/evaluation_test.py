"""The evaluation callbacks: linear probes (pooling, learning, a frozen backbone), kNN and cluster metrics
in a model's fit, on 1 and 2 replicas, and the K-means labeller through SelfLabelCallback."""

import itertools

import faiss
import keras
import numpy as np
import pytest
import tensorflow as tf

from selabel_tf import callbacks as callbacks_lib
from selabel_tf import kmeans
from selabel_tf.data import sources
from selabel_tf.evaluation import callbacks as eval_callbacks
from selabel_tf.evaluation import cluster_metrics
from selabel_tf.evaluation import knn
from selabel_tf.evaluation import probes
from selabel_tf.evaluation import suite
from selabel_tf.modeling import backbones
from selabel_tf.modeling.sela import SelaModel

SIZE, NUM_CLASSES = 16, 3


# --------------------------------------------------------------------------------------------------
# Pooling


def _adaptive_max_pool_reference(x, out_h, out_w):
  """PyTorch's AdaptiveMaxPool2d in numpy: bin i covers floor(i h / o) .. ceil((i + 1) h / o) - 1."""
  batch, height, width, channels = x.shape
  y = np.zeros((batch, out_h, out_w, channels), x.dtype)
  for i, j in itertools.product(range(out_h), range(out_w)):
    r0, r1 = (i * height) // out_h, -(-((i + 1) * height) // out_h)
    c0, c1 = (j * width) // out_w, -(-((j + 1) * width) // out_w)
    y[:, i, j] = x[:, r0:r1, c0:c1].max(axis=(1, 2))
  return y


@pytest.mark.parametrize("height,width,out_h,out_w", [(55, 55, 10, 10), (13, 13, 5, 5), (28, 28, 12, 12),
                                                      (6, 6, 5, 5), (7, 9, 3, 4), (6, 6, 6, 6)])
def test_adaptive_max_pool_equals_pytorch_bins(height, width, out_h, out_w):
  x = np.random.default_rng(0).normal(size=(2, height, width, 3)).astype(np.float32)
  y = probes.AdaptiveMaxPool2D((out_h, out_w))(x)
  np.testing.assert_array_equal(np.asarray(y), _adaptive_max_pool_reference(x, out_h, out_w))


def test_probe_dimensions_at_224_px_are_the_official_ones():
  """The official probes pool the 224 px AlexNet's conv1..conv5 to 9600, 9216, 9600, 9600, 9216."""
  dims = probes.probe_dimensions("alexnet", 224, 3)
  assert [dims[f"conv{i}"][1] for i in range(1, 6)] == [9600, 9216, 9600, 9600, 9216]
  assert dims["features"] == ((4096,), 4096)
  for size in (28, 32, 96):
    for layer, (_, dim) in probes.probe_dimensions("alexnet_small", size, 1).items():
      assert dim <= probes.TARGET_DIMENSIONS, (size, layer, dim)


def test_unknown_probe_layer_is_named():
  model = backbones.build_backbone("resnet18", (SIZE, SIZE, 1))
  with pytest.raises(ValueError, match="probe layer 'conv9' is not an output"):
    probes.activation_pooling(model, ["conv9"])


# --------------------------------------------------------------------------------------------------
# Probes learn


def test_probe_learns_linearly_separable_activations():
  rng = np.random.default_rng(0)
  num_train, num_test, dim, classes = 3000, 600, 64, 4
  directions = rng.normal(size=(classes, dim))
  y_train, y_test = rng.integers(0, classes, num_train), rng.integers(0, classes, num_test)

  def activations(y):
    return (3 * directions[y] + rng.normal(size=(len(y), dim))).astype(np.float16)

  noise = {"noise": rng.normal(size=(num_train, 8)).astype(np.float16)}
  result = probes.train_on_cache(
      {"separable": activations(y_train), **noise}, y_train,
      {"separable": activations(y_test), "noise": rng.normal(size=(num_test, 8)).astype(np.float16)},
      y_test, num_classes=classes, options=probes.ProbeOptions(epochs=4))
  assert result.test_top1["separable"] >= 0.99
  assert result.train_top1["separable"] >= 0.99
  assert result.test_top1["noise"] < 0.4  # chance is 0.25: the probes do not share their inputs
  assert result.best_layer == "separable"


# --------------------------------------------------------------------------------------------------
# The callbacks in a fit


def _prototype_data(num_examples, seed):
  """Noisy copies of one prototype image per class: data a network can tell apart."""
  rng = np.random.default_rng(seed)
  prototypes = np.random.default_rng(0).integers(0, 256, size=(NUM_CLASSES, SIZE, SIZE, 1))
  labels = rng.integers(0, NUM_CLASSES, num_examples)
  images = np.clip(prototypes[labels] + rng.normal(0, 30, size=(num_examples, SIZE, SIZE, 1)), 0, 255)
  dataset = sources.Dataset(name=f"prototypes{seed}", images=images.astype(np.uint8),
                            original_index=np.arange(num_examples), kind="small", origin="test")
  return dataset, sources.GroundTruth(labels.astype(np.int64), ("a", "b", "c"))


@pytest.fixture(name="data", scope="module")
def _data():
  train, train_truth = _prototype_data(120, 1)
  test, test_truth = _prototype_data(50, 2)  # 50: the last batch of 16 splits unevenly over 2 replicas
  return eval_callbacks.EvaluationData(train, train_truth, test, test_truth, image_size=SIZE,
                                       batch_size=16)


def _sela_model(strategy, num_examples, heads=(3, 5), learning_rate=0.01):
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = SelaModel("alexnet_small", (SIZE, SIZE, 1), heads, num_examples, name="sela")
    model.build()
    model.compile_for_self_labelling(keras.optimizers.SGD(learning_rate))
  return model


def _weights(model):
  return [np.array(w) for w in model.weights]


@pytest.mark.parametrize("mode", ["cached", "streamed"])
def test_probe_never_changes_the_backbone(data, mode):
  """Bitwise, BatchNorm moving statistics and the label state included; and dropout is off in the
  cached pass (two passes give the same activations)."""
  model = _sela_model(tf.distribute.get_strategy(), data.train.num_examples)
  before = _weights(model)
  callback = eval_callbacks.LinearProbeCallback(
      data, layers=("conv2", "features"), mode=mode,
      options=probes.ProbeOptions(epochs=1, batch_size=16))
  callback.set_model(model)
  metrics = callback.evaluate()
  assert set(metrics) >= {"probe_test_top1/conv2", "probe_train_top1/features", "probe_best_layer"}
  assert model.trainable  # the streamed mode froze a copy, not the model
  for a, b in zip(before, _weights(model)):
    np.testing.assert_array_equal(a, b)


def test_callbacks_in_fit_on_one_and_two_replicas_agree(data, mirrored_strategy):
  """The same network evaluated in a fit on 1 and on 2 replicas. (Learning rate 0: training on 1 and 2
  replicas drifts apart in float32 rounding, and an argmax of that drift is not the evaluation's.)"""
  results = {}
  for name, strategy in {"one": tf.distribute.OneDeviceStrategy("/cpu:0"),
                         "two": mirrored_strategy}.items():
    model = _sela_model(strategy, data.train.num_examples, learning_rate=0.0)
    model.label_state.assign(np.stack([np.arange(120) % 3, np.arange(120) % 5]),
                             [np.zeros(3), np.zeros(5)])
    callbacks = suite.build_callbacks(
        data, suite.EvaluationOptions(knn_ks=(5, 20), probe_layers=("conv5", "features"),
                                      probe=probes.ProbeOptions(epochs=1, batch_size=24)),
        every_epochs=1)
    train = tf.data.Dataset.from_tensor_slices(
        {"index": np.arange(120, dtype=np.int64),
         "image": data.train.images.astype(np.float32) / 255.0}).batch(16, drop_remainder=True)
    history = model.fit(train, epochs=1, callbacks=callbacks, verbose=0)
    results[name] = suite.collect_metrics(callbacks)
    # Keras logs carry the evaluation (so History and TensorBoard see it).
    assert "knn_top1/pool5/k=5" in history.history  # the backbone's embedding
    assert "cluster_test/head_1/nmi" in history.history
  one, two = results["one"], results["two"]
  assert {k for k in one if not k.endswith("_seconds")} == {k for k in two if not k.endswith("_seconds")}
  for key in one:
    if (key.startswith("knn_top1/") or key.startswith("cluster_")) and not key.endswith("_seconds"):
      assert one[key] == pytest.approx(two[key], abs=1e-5), key
  for key in one:  # probes train with synchronized BatchNorm: the same up to float32 drift
    if key.startswith("probe_test_top1/"):
      assert one[key] == pytest.approx(two[key], abs=2 / 50 + 1e-6), key


def test_cluster_metrics_callback_matches_scikit_learn_on_the_model(data):
  model = _sela_model(tf.distribute.get_strategy(), data.train.num_examples)
  labels = np.stack([np.arange(120) % 3, (np.arange(120) * 7) % 5])
  model.label_state.assign(labels, [np.zeros(3), np.zeros(5)])
  callback = eval_callbacks.ClusterMetricsCallback(data)
  callback.set_model(model)
  metrics = callback.evaluate()
  from sklearn import metrics as sk  # pylint: disable=g-import-not-at-top
  assert metrics["cluster_selabel/head_1/nmi"] == pytest.approx(
      sk.normalized_mutual_info_score(data.train_truth.labels, labels[1]))
  # The head's argmax on the test split, from the model itself.
  images = data.test.images.astype(np.float32) / 255.0
  mean, std = data.test.normalization()
  predictions = np.argmax(model((images - mean[0]) / std[0], training=False)[0], axis=-1)
  expected = cluster_metrics.cluster_metrics(predictions, data.test_truth.labels, num_clusters=3)
  for name, value in expected.items():
    assert metrics[f"cluster_test/head_0/{name}"] == pytest.approx(value, abs=1e-9), name
  assert metrics["cluster_selabel/head_1/majority_accuracy"] >= 0  # K = 5 > 3 classes


def test_cluster_metrics_of_a_model_without_label_state_count_its_empty_clusters(data):
  """K of each head comes from its output width (as for an export's heads), not from the labels seen:
  a head of 5 clusters whose argmax is always cluster 0 has 4 empty clusters and size entropy 0 / log 5."""
  images = keras.Input((SIZE, SIZE, 1))
  flat = keras.layers.Flatten()(images)
  activations = keras.Model(images, {"features": keras.layers.Dense(4)(flat)})
  head = keras.layers.Dense(5, kernel_initializer="zeros",
                            bias_initializer=keras.initializers.Constant([5.0, 0, 0, 0, 0]))
  heads = keras.Model(images, [head(flat)])
  cache = eval_callbacks.ActivationCache(data, ["features"], heads=True, activations=activations)
  callback = eval_callbacks.ClusterMetricsCallback(data, cache=cache)
  callback.set_model(heads)
  metrics = callback.evaluate()
  expected = cluster_metrics.cluster_metrics(np.zeros(50, np.int64), data.test_truth.labels, num_clusters=5)
  assert expected["size_min"] == 0 and expected["size_max"] == 50
  for name, value in expected.items():
    assert metrics[f"cluster_test/head_0/{name}"] == pytest.approx(value, abs=1e-9), name
  assert not any(k.startswith("cluster_selabel/") for k in metrics)


@pytest.mark.parametrize("layer,key,stored", [
    ("features", "features", np.float32),  # fc7, the heads' input, kept float32
    (None, "pool5", np.float16),  # default: the backbone's embedding, stored narrow as the probe layers
])
def test_knn_callback_equals_the_knn_of_the_model_activations(data, layer, key, stored):
  model = _sela_model(tf.distribute.get_strategy(), data.train.num_examples)
  callback = eval_callbacks.KNNCallback(data, layer=layer, ks=(3, 7))
  callback.set_model(model)
  metrics = callback.evaluate()
  assert sorted(metrics) == ["knn_seconds", f"knn_top1/{key}/k=3", f"knn_top1/{key}/k=7"]

  def activations(split):
    dataset, _ = data.split(split)
    mean, std = dataset.normalization()
    images = (dataset.images.astype(np.float32) / 255.0 - mean[0]) / std[0]
    values = np.asarray(model.features(images, training=False)[key])
    return values.reshape(len(values), -1).astype(stored)

  expected = knn.weighted_knn(activations("train"), data.train_truth.labels, activations("test"),
                              num_classes=NUM_CLASSES, ks=(3, 7)).accuracy(data.test_truth.labels)
  assert metrics[f"knn_top1/{key}/k=3"] == pytest.approx(expected[3], abs=1e-9)
  assert metrics[f"knn_top1/{key}/k=7"] == pytest.approx(expected[7], abs=1e-9)


def test_evaluation_callback_errors(data):
  with pytest.raises(ValueError, match="every_epochs must be None or >= 1"):
    eval_callbacks.KNNCallback(data, every_epochs=0)
  with pytest.raises(ValueError, match="mode must be one of"):
    eval_callbacks.LinearProbeCallback(data, mode="online")
  with pytest.raises(ValueError, match="has no `backbone`: pass activations="):
    callback = eval_callbacks.KNNCallback(data)
    model = keras.Sequential([keras.Input((SIZE, SIZE, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    callback.set_model(model)
    callback.evaluate()


# --------------------------------------------------------------------------------------------------
# The K-means labeller in SelfLabelCallback


def test_kmeans_labeller_labels_the_model_features_with_faiss(data):
  heads = (3, 5)
  model = _sela_model(tf.distribute.get_strategy(), data.train.num_examples, heads)
  images = (data.train.images.astype(np.float32) / 255.0)
  label_pass = tf.data.Dataset.from_tensor_slices(
      {"index": np.arange(120, dtype=np.int64), "image": images}).batch(32)
  callback = callbacks_lib.SelfLabelCallback(label_pass, 120, 10.0, steps=[0], labeller="kmeans",
                                             labeller_options={"seed": 3, "pca_dim": 16}, verbose=0)
  callback.set_model(model)
  callback.relabel()
  labels = model.label_state.current_labels()
  for t, k in enumerate(heads):
    assert np.bincount(labels[t], minlength=k).min() > 0 and labels[t].max() == k - 1
  # The same as faiss' own K-means on the preprocessed features of the model, with the same seeds.
  features = np.asarray(model.features(images, training=False)["features"])
  prepared = kmeans.preprocess_features(features, pca_dim=16, seed=3)
  for t, k in enumerate(heads):
    reference = faiss.Kmeans(prepared.shape[1], k, niter=20, seed=3 + t, max_points_per_centroid=10**7)
    reference.train(prepared)
    _, assigned = reference.index.search(prepared, 1)
    np.testing.assert_array_equal(labels[t], assigned[:, 0])
  assert "selabel_kmeans_inertia" in callback.last_metrics


def _label_pass(images):
  return tf.data.Dataset.from_tensor_slices(
      {"index": np.arange(len(images), dtype=np.int64), "image": images}).batch(32)


@pytest.mark.parametrize("layer", ["pool5", "conv2"])  # conv2: a [h, w, c] map with h, w > 1, flattened
def test_kmeans_on_a_layer_l2_normalised_is_faiss_on_numpy_normalised_rows(data, layer):
  heads = (3, 5)
  model = _sela_model(tf.distribute.get_strategy(), data.train.num_examples, heads)
  images = (data.train.images.astype(np.float32) / 255.0)
  callback = callbacks_lib.SelfLabelCallback(_label_pass(images), 120, 10.0, steps=[0], labeller="kmeans",
                                             labeller_options={"seed": 3, "preprocessing": "l2"},
                                             kmeans_layer=layer, verbose=0)
  callback.set_model(model)
  callback.relabel()
  labels = model.label_state.current_labels()
  # Reference: the layer flattened (numpy), normalised by numpy, faiss' K-means with the same seeds.
  values = np.concatenate([np.asarray(model.features(images[i:i + 32], training=False)[layer])
                           for i in range(0, 120, 32)]).reshape(120, -1)
  assert values.shape[1] == int(np.prod(model.backbone.output[layer].shape[1:]))
  assert layer == "pool5" or model.backbone.output[layer].shape[1] > 1
  rows = values / np.linalg.norm(values, axis=1, keepdims=True)
  for t, k in enumerate(heads):
    reference = faiss.Kmeans(rows.shape[1], k, niter=20, seed=3 + t, max_points_per_centroid=10**7)
    reference.train(rows)
    _, assigned = reference.index.search(rows, 1)
    np.testing.assert_array_equal(labels[t], assigned[:, 0])


def test_cold_start_labellings_label_by_k_means_first_then_by_the_labeller(data):
  model = _sela_model(tf.distribute.get_strategy(), data.train.num_examples)
  images = (data.train.images.astype(np.float32) / 255.0)
  callback = callbacks_lib.SelfLabelCallback(_label_pass(images), 120, 10.0, steps=[0, 1, 2],
                                             cold_start_labeller="kmeans", cold_start_labellings=np.int64(2),
                                             cold_start_options={"seed": 3, "pca_dim": 16}, verbose=0)
  callback.set_model(model)
  done = []
  for _ in range(3):
    done.append(callback.labeller_due())
    callback.relabel()
    done.append("selabel_kmeans_inertia" in callback.last_metrics)
  assert done == ["kmeans", True, "kmeans", True, "sinkhorn", False]
  assert model.label_state.labellings_done() == 3


def test_bad_cold_start_labellings_and_kmeans_layer_raise(data):
  for bad in (0, 1.5, True, np.int64(0)):
    with pytest.raises(ValueError, match="cold_start_labellings must be an int >= 1"):
      callbacks_lib.SelfLabelCallback(None, 10, 10.0, steps=[0], num_clusters=[3], cold_start_labellings=bad)
  model = _sela_model(tf.distribute.get_strategy(), data.train.num_examples)
  images = (data.train.images.astype(np.float32) / 255.0)
  callback = callbacks_lib.SelfLabelCallback(_label_pass(images), 120, 10.0, steps=[0], labeller="kmeans",
                                             kmeans_layer="fc9", verbose=0)
  callback.set_model(model)
  with pytest.raises(ValueError, match=r"kmeans_layer='fc9' needs the key 'fc9', not one of the model's "
                     r"features\(images\) keys \['conv1', "):
    callback.relabel()
  assert model.label_state.labellings_done() == 0


def test_kmeans_labeller_needs_a_features_method():
  model = keras.Sequential([keras.Input((SIZE, SIZE, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
  callback = callbacks_lib.SelfLabelCallback(None, 10, 10.0, steps=[0], labeller="kmeans",
                                             num_clusters=[3])
  with pytest.raises(ValueError, match="labeller='kmeans' needs a model with a features"):
    callback.set_model(model)
  with pytest.raises(ValueError, match="labeller must be one of"):
    callbacks_lib.SelfLabelCallback(None, 10, 10.0, steps=[0], labeller="spectral", num_clusters=[3])
