"""SelfLabelCallback: the cold-start labelling and the label pass on a twin model."""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from selabel_tf import callbacks as callbacks_lib
from selabel_tf import label_store
from selabel_tf.modeling.sela import SelaModel

NUM_EXAMPLES, SHAPE = 2000, (16, 16, 1)


def _indexed(images, batch=256):
  return tf.data.Dataset.from_tensor_slices(
      {"index": np.arange(len(images), dtype=np.int64), "image": images}).batch(batch)


def _flat_model(num_clusters):
  """Every image gets the same logits: the extreme of an untrained network's flat predictions."""
  images = keras.Input(SHAPE)
  features = keras.layers.Flatten()(images)
  logits = keras.layers.Dense(num_clusters, kernel_initializer="zeros",
                              bias_initializer=keras.initializers.RandomNormal(seed=0))(features)
  model = keras.Model(images, logits)
  model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return model


@pytest.mark.parametrize("cold_start_balance", ["sample", None])
def test_first_labelling_samples_a_flat_q_and_later_ones_take_the_argmax(cold_start_balance):
  num_clusters = 10
  images = np.random.default_rng(0).normal(size=(NUM_EXAMPLES,) + SHAPE).astype(np.float32)
  callback = callbacks_lib.SelfLabelCallback(_indexed(images), NUM_EXAMPLES, 10.0, steps=[0],
                                             num_clusters=(num_clusters,),
                                             cold_start_balance=cold_start_balance, verbose=0)
  callback.set_model(_flat_model(num_clusters))

  first = callback.relabel()
  second = callback.relabel()  # warm-started: the paper's argmax

  sizes = first.cluster_sizes()
  if cold_start_balance == "sample":
    sigma = np.sqrt(NUM_EXAMPLES * 0.1 * 0.9)
    assert np.all(np.abs(sizes - NUM_EXAMPLES / num_clusters) <= 5 * sigma), sizes
  else:
    assert sizes.max() == NUM_EXAMPLES
  assert second.cluster_sizes().max() == NUM_EXAMPLES
  assert callback.last_metrics["selabel_largest_cluster"] == NUM_EXAMPLES


def test_bad_cold_start_balance_raises():
  with pytest.raises(ValueError, match="cold_start_balance must be None or one of"):
    callbacks_lib.SelfLabelCallback(_indexed(np.zeros((4,) + SHAPE, np.float32)), 4, 10.0, steps=[0],
                                    num_clusters=(2,), cold_start_balance="round")


def _sela_model():
  keras.utils.set_random_seed(0)
  model = SelaModel("alexnet_small", SHAPE, (5, 3), 300, name="sela")
  model.build()
  model.compile_for_self_labelling(keras.optimizers.SGD(0.1))
  return model


def _perturb(model):
  """New weights, as training would give (the twin must see these, not the ones it was built with)."""
  rng = np.random.default_rng(1)
  for variable in model.trainable_weights:
    variable.assign(np.asarray(variable) * rng.uniform(0.5, 1.5, size=variable.shape) + 1e-3)


def _label_passes_on_model_and_twin(dtype_policy, seed):
  """(model, twin, log-probs of the model's own pass, of the pass on the twin) after new weights."""
  images = np.random.default_rng(seed).normal(size=(300,) + SHAPE).astype(np.float32)
  model = _sela_model()
  twin = model.with_dtype_policy(dtype_policy)
  _perturb(model)
  passes = []
  for label_model in (None, twin):
    callback = callbacks_lib.SelfLabelCallback(_indexed(images, 64), 300, 10.0, steps=[0], verbose=0,
                                               label_model=label_model)
    callback.set_model(model)
    passes.append(callback.collect_log_probs())
  return model, twin, passes[0], passes[1]


def test_label_pass_on_a_twin_uses_the_trained_weights():
  _, _, expected, got = _label_passes_on_model_and_twin("float32", seed=2)

  for a, b in zip(expected, got):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_label_pass_in_mixed_bfloat16_while_training_in_float32():
  model, twin, expected, got = _label_passes_on_model_and_twin("mixed_bfloat16", seed=3)

  assert keras.mixed_precision.global_policy().name == "float32"  # restored after building the twin
  assert model.backbone.get_layer("conv2_conv").compute_dtype == "float32"
  assert twin.backbone.get_layer("conv2_conv").compute_dtype == "bfloat16"
  assert twin.heads.compute_dtype == "float32"
  for a, b in zip(expected, got):
    difference = np.abs(b - a)
    assert 0 < difference.max() < 0.1  # bfloat16 has 8 bits of mantissa: differs, but not by much
    assert np.mean(np.argmax(a, 1) == np.argmax(b, 1)) > 0.9


def test_label_model_with_other_weights_raises():
  images = np.zeros((300,) + SHAPE, np.float32)
  model = _sela_model()
  other = SelaModel("alexnet_small", SHAPE, (5, 4), 300, name="other")
  other.build()
  callback = callbacks_lib.SelfLabelCallback(_indexed(images), 300, 10.0, steps=[0], verbose=0,
                                             label_model=other)
  callback.set_model(model)
  with pytest.raises(ValueError, match="label_model 'other' does not have the weights of the trained "
                                       "model 'sela'"):
    callback.collect_log_probs()


def test_label_pass_twin_only_for_another_policy():
  model = _sela_model()  # float32
  assert model.label_pass_twin("model") is None
  assert model.label_pass_twin("float32") is None
  twin = model.label_pass_twin("mixed_bfloat16")
  assert twin.backbone.get_layer("conv2_conv").compute_dtype == "bfloat16"
  assert [tuple(w.shape) for w in twin.weights] == [tuple(w.shape) for w in model.weights]


# --------------------------------------------------------------------------------------------------
# Initial labels and which heads a labelling re-assigns


def test_initial_labels_are_a_random_equipartition_per_seed_and_head():
  from selabel_tf.modeling import sela  # pylint: disable=g-import-not-at-top
  labels = sela.initial_labels(1003, 10, seed=0, head=0)
  assert labels.dtype == np.int32 and labels.shape == (1003,)
  assert sorted(np.bincount(labels, minlength=10).tolist()) == [100] * 7 + [101] * 3  # exact
  np.testing.assert_array_equal(labels, sela.initial_labels(1003, 10, seed=0, head=0))
  assert np.mean(labels == np.arange(1003) % 10) < 0.2  # shuffled, not index mod K
  assert np.mean(labels == sela.initial_labels(1003, 10, seed=1, head=0)) < 0.2
  assert np.mean(labels == sela.initial_labels(1003, 10, seed=0, head=1)) < 0.2


def test_sela_model_starts_from_its_seeds_random_equipartition():
  from selabel_tf.modeling import sela  # pylint: disable=g-import-not-at-top
  model = SelaModel("alexnet_small", SHAPE, (5, 3), 300, label_seed=7, name="sela")
  model.build()
  start = model.label_state.current_labels()
  for t, k in enumerate((5, 3)):
    np.testing.assert_array_equal(start[t], sela.initial_labels(300, k, seed=7, head=t))
  clone = SelaModel.from_config(model.get_config())
  np.testing.assert_array_equal(clone.label_state.current_labels(), start)


def test_cyclic_relabelling_relabels_one_head_in_turn_and_leaves_the_others_bitwise():
  num_clusters = (4, 5, 6)
  images = np.random.default_rng(0).normal(size=(300,) + SHAPE).astype(np.float32)
  keras.utils.set_random_seed(0)
  model = SelaModel("alexnet_small", SHAPE, num_clusters, 300, name="sela")
  model.build()
  model.compile_for_self_labelling(keras.optimizers.SGD(0.1))
  _perturb(model)
  callback = callbacks_lib.SelfLabelCallback(_indexed(images, 64), 300, 10.0, steps=[0], verbose=0,
                                             relabel_heads="cyclic")
  callback.set_model(model)
  state = model.label_state
  for m in range(5):
    before_labels = state.current_labels()
    before_alpha = [np.array(v) for v in state.log_alpha]
    due = callback.heads_due()
    assert due == [m % 3]
    result = callback.relabel()
    after = state.current_labels()
    for t in range(3):
      if t == m % 3:
        np.testing.assert_array_equal(after[t], result.labels[0])  # the labeller's labels of head t
        np.testing.assert_array_equal(np.array(state.log_alpha[t]), np.float32(result.log_row_scale[0]))
      else:
        np.testing.assert_array_equal(after[t], before_labels[t])
        np.testing.assert_array_equal(np.array(state.log_alpha[t]), before_alpha[t])
    assert state.labellings_done() == m + 1


def test_all_heads_relabelling_writes_every_head():
  images = np.random.default_rng(0).normal(size=(300,) + SHAPE).astype(np.float32)
  model = _sela_model()
  _perturb(model)
  callback = callbacks_lib.SelfLabelCallback(_indexed(images, 64), 300, 10.0, steps=[0], verbose=0)
  callback.set_model(model)
  assert callback.heads_due() == [0, 1]
  result = callback.relabel()
  np.testing.assert_array_equal(model.label_state.current_labels(), result.labels)


def test_bad_relabel_heads_raises():
  with pytest.raises(ValueError, match=r"relabel_heads must be one of \('all', 'cyclic'\), got 'one'"):
    callbacks_lib.SelfLabelCallback(_indexed(np.zeros((4,) + SHAPE, np.float32)), 4, 10.0, steps=[0],
                                    num_clusters=(2,), relabel_heads="one")


def test_each_labelling_logs_contact_sheets_of_the_relabelled_heads_to_tensorboard(tmp_path):
  from selabel_tf import contact_sheets  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).normal(size=(300,) + SHAPE).astype(np.float32)
  shown = np.random.default_rng(1).integers(0, 256, size=(300, 16, 16, 1), dtype=np.uint8)
  model = _sela_model()
  _perturb(model)
  callback = callbacks_lib.SelfLabelCallback(_indexed(images, 64), 300, 10.0, steps=[0], verbose=0,
                                             log_dir=str(tmp_path), sheet_images=shown, sheet_clusters=4)
  callback.set_model(model)
  callback.relabel()
  log_probs = callback.collect_log_probs()  # the same weights and data: the pass the labelling read
  labels = model.label_state.current_labels()
  logged = {}
  for path in sorted(tmp_path.iterdir()):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag.startswith("selabel_clusters/"):
          logged[value.tag] = tf.io.decode_png(tf.make_ndarray(value.tensor)[2]).numpy()
  assert sorted(logged) == ["selabel_clusters/head_0", "selabel_clusters/head_1"]
  for t, num_shown in ((0, 4), (1, 3)):  # heads of 5 and 3 clusters, at most 4 shown
    confidence = np.exp(log_probs[t][np.arange(300), labels[t]])
    expected = contact_sheets.overview(shown, labels[t], confidence, (5, 3)[t], clusters=range(num_shown))
    np.testing.assert_array_equal(logged[f"selabel_clusters/head_{t}"], expected)


def test_sheet_images_must_cover_the_examples():
  with pytest.raises(ValueError, match="sheet_images holds 3 images, not the num_examples=4"):
    callbacks_lib.SelfLabelCallback(_indexed(np.zeros((4,) + SHAPE, np.float32)), 4, 10.0, steps=[0],
                                    num_clusters=(2,), sheet_images=np.zeros((3, 16, 16, 1), np.uint8))


@pytest.mark.parametrize("feature_dtype", ["float32", "bfloat16"])
def test_features_store_labels_as_the_log_probs_store(feature_dtype):
  """label_store="features" keeps [N, D] once and computes each head from it: the same log-probs
  (float32 features: within 1e-5; bfloat16: within its rounding) and the same labels."""
  images = np.random.default_rng(3).normal(size=(300,) + SHAPE).astype(np.float32)
  results = {}
  for store in ("log_probs", "features"):
    model = _sela_model()
    _perturb(model)
    callback = callbacks_lib.SelfLabelCallback(_indexed(images, batch=64), 300, 10.0, steps=[0],
                                               label_store=store, feature_dtype=feature_dtype,
                                               labeller_options={"tol": 1e-3}, verbose=0)
    callback.set_model(model)
    log_probs = callback.collect_log_probs()
    results[store] = ([np.asarray(log_probs[t][0:300]) for t in range(2)], callback.relabel().labels)
  stored, features = results["log_probs"], results["features"]
  for t in range(2):
    np.testing.assert_allclose(features[0][t], stored[0][t], atol=1e-5 if feature_dtype == "float32" else 0.05)
  agreement = np.mean(features[1] == stored[1])
  assert agreement >= (1.0 if feature_dtype == "float32" else 0.9), agreement


def test_features_in_a_file_label_as_features_in_memory(tmp_path):
  """feature_dir keeps the label pass's features in a file: the same labels and alpha bit for bit as in
  memory, and no file is left in the directory after the labelling."""
  images = np.random.default_rng(4).normal(size=(300,) + SHAPE).astype(np.float32)
  results = []
  for feature_dir in (None, str(tmp_path)):
    model = _sela_model()
    _perturb(model)
    callback = callbacks_lib.SelfLabelCallback(_indexed(images, batch=64), 300, 10.0, steps=[0],
                                               label_store="features", feature_dir=feature_dir,
                                               labeller_options={"tol": 1e-3}, verbose=0)
    callback.set_model(model)
    heads = callback.collect_log_probs()
    assert isinstance(heads.features, label_store.FeatureFile) == (feature_dir is not None)
    heads.close()
    results.append(callback.relabel())
  np.testing.assert_array_equal(results[1].labels, results[0].labels)
  for from_file, in_memory in zip(results[1].log_row_scale, results[0].log_row_scale):
    np.testing.assert_array_equal(from_file, in_memory)
  assert os.listdir(tmp_path) == []


def test_feature_dir_names_what_it_needs(tmp_path):
  images = np.zeros((4,) + SHAPE, np.float32)
  kwargs = dict(steps=[0], num_clusters=(2,))
  with pytest.raises(ValueError, match="feature_dir='/no/such' is not a directory"):
    callbacks_lib.SelfLabelCallback(_indexed(images), 4, 10.0, label_store="features", feature_dir="/no/such",
                                    **kwargs)
  with pytest.raises(ValueError, match="keeps the features of label_store='features' in a file; label_store "
                                       "is 'log_probs'"):
    callbacks_lib.SelfLabelCallback(_indexed(images), 4, 10.0, feature_dir=str(tmp_path), **kwargs)
  with pytest.raises(ValueError, match="label_sharding='sharded' keeps each replica's share on its device"):
    callbacks_lib.SelfLabelCallback(_indexed(images), 4, 10.0, label_store="features",
                                    feature_dir=str(tmp_path), label_sharding="sharded", **kwargs)


def test_features_store_needs_one_pass_and_linear_heads():
  images = np.zeros((4,) + SHAPE, np.float32)
  with pytest.raises(ValueError, match="label_store='features' keeps one pass's features; num_passes=2"):
    callbacks_lib.SelfLabelCallback(_indexed(images), 4, 10.0, steps=[0], num_clusters=(2,),
                                    label_store="features", num_passes=2)
  with pytest.raises(ValueError, match="label_store must be one of"):
    callbacks_lib.SelfLabelCallback(_indexed(images), 4, 10.0, steps=[0], num_clusters=(2,),
                                    label_store="logits")
  callback = callbacks_lib.SelfLabelCallback(_indexed(images), 4, 10.0, steps=[0], num_clusters=(2,),
                                             label_store="features")
  with pytest.raises(ValueError, match=r"needs a model with features\(images\) and linear_heads\(\)"):
    callback.set_model(_flat_model(2))


def _nmi_float64(classes, clusters):
  """NMI with the arithmetic-mean normalisation (scikit-learn's default), in numpy float64."""
  joint = np.zeros((classes.max() + 1, clusters.max() + 1))
  np.add.at(joint, (classes, clusters), 1.0)
  joint /= joint.sum()
  p, q = joint.sum(axis=1), joint.sum(axis=0)
  nonzero = joint > 0
  mutual = np.sum(joint[nonzero] * np.log(joint[nonzero] / np.outer(p, q)[nonzero]))
  entropy = lambda d: -np.sum(d[d > 0] * np.log(d[d > 0]))
  return mutual / ((entropy(p) + entropy(q)) / 2)


def test_class_labels_record_each_labellings_nmi_of_the_relabelled_heads_and_change_no_label(tmp_path):
  images = np.random.default_rng(0).normal(size=(300,) + SHAPE).astype(np.float32)
  classes = np.random.default_rng(1).integers(0, 4, size=300)
  labels_by_run = []
  for class_labels in (None, classes):
    keras.utils.set_random_seed(0)
    model = SelaModel("alexnet_small", SHAPE, (4, 5, 6), 300, name="sela")
    model.build()
    model.compile_for_self_labelling(keras.optimizers.SGD(0.1))
    _perturb(model)
    callback = callbacks_lib.SelfLabelCallback(
        _indexed(images, 64), 300, 10.0, steps=[0], verbose=0, relabel_heads="cyclic",
        log_dir=str(tmp_path) if class_labels is not None else None, class_labels=class_labels)
    callback.set_model(model)
    if class_labels is None:
      without_classes = callback
    initial = model.label_state.current_labels()
    runs = []
    for m in range(4):
      callback.relabel()
      runs.append(model.label_state.current_labels())
    labels_by_run.append(runs)
  np.testing.assert_array_equal(labels_by_run[0], labels_by_run[1])  # never read by the labeller
  assert [sorted(r) for r in without_classes.labelling_records] == [
      ["changed", "heads", "labeller", "labelling", "seconds", "step"]] * 4
  records = callback.labelling_records
  assert [(r["labelling"], r["heads"], r["labeller"]) for r in records] == [
      (1, [0], "sinkhorn"), (2, [1], "sinkhorn"), (3, [2], "sinkhorn"), (4, [0], "sinkhorn")]
  logged = {}
  for path in sorted(tmp_path.iterdir()):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag.startswith(("selabel_nmi/", "selabel_ari/")):
          logged.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  for m, record in enumerate(records):
    head = m % 3
    expected_nmi = _nmi_float64(classes, labels_by_run[1][m][head])
    assert record["nmi"] == [pytest.approx(expected_nmi, abs=1e-12)]
    assert record["ari"] == [pytest.approx(metrics.adjusted_rand_score(classes, labels_by_run[1][m][head]))]
    previous = labels_by_run[1][m - 1][head] if m else initial[head]
    assert record["changed"] == [pytest.approx(np.mean(labels_by_run[1][m][head] != previous))]
    assert (record["changed"][0] > 0) == (m < 3)  # from the random start; then the same weights again
  assert logged["selabel_nmi/head_0"] == pytest.approx([records[0]["nmi"][0], records[3]["nmi"][0]])
  assert logged["selabel_nmi/head_1"] == pytest.approx(records[1]["nmi"])
  assert logged["selabel_ari/head_2"] == pytest.approx(records[2]["ari"])


@pytest.mark.parametrize("class_labels, shown", [
    (np.zeros(3, np.int64), "int64 (3,), minimum 0"), (np.zeros(4, np.float32), "float32 (4,), minimum 0.0"),
    (np.array([0, 1, -1, 2]), "int64 (4,), minimum -1"), (np.array(["a"] * 4), "<U1 (4,)")])
def test_class_labels_must_be_one_non_negative_int_per_example(class_labels, shown):
  with pytest.raises(ValueError, match=r"class_labels must be non-negative ints of shape \(4,\) "
                                       rf"\(num_examples\), got {re.escape(shown)}"):
    callbacks_lib.SelfLabelCallback(_indexed(np.zeros((4,) + SHAPE, np.float32)), 4, 10.0, steps=[0],
                                    num_clusters=(2,), class_labels=class_labels)


def test_class_labels_take_a_list_or_any_int_dtype():
  for class_labels in ([0, 1, 1, 0], np.array([0, 1, 1, 0], np.int32), np.array([0, 1, 1, 0], np.uint8)):
    callback = callbacks_lib.SelfLabelCallback(_indexed(np.zeros((4,) + SHAPE, np.float32)), 4, 10.0,
                                               steps=[0], num_clusters=(2,), class_labels=class_labels)
    np.testing.assert_array_equal(callback.class_labels, [0, 1, 1, 0])
