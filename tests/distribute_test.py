"""SeLa under tf.distribute: a MirroredStrategy over the 2 logical CPUs of tests/conftest.py.

With a fixed global batch, one step on 1 replica and on 2 replicas must give the same loss and weights
(BatchNorm is synchronized, so its statistics cover the global batch either way), and a short run
must give the same self-labels.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from selabel_tf import callbacks as callbacks_lib
from selabel_tf.modeling.sela import SelaModel

NUM_EXAMPLES, BATCH, SHAPE, HEADS = 64, 16, (16, 16, 1), (4, 3)


@pytest.fixture(name="strategies")
def _strategies(mirrored_strategy):
  return {"one": tf.distribute.OneDeviceStrategy("/cpu:0"), "two": mirrored_strategy}


def _data():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(NUM_EXAMPLES,) + SHAPE).astype(np.float32)
  return images


def _model(strategy, learning_rate=0.1):
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = SelaModel("resnet18", SHAPE, HEADS, NUM_EXAMPLES, name="sela")
    model.build()
    model.compile_for_self_labelling(keras.optimizers.SGD(learning_rate, momentum=0.9))
  return model


def _train_batches(images, steps):
  order = np.random.default_rng(1).permutation(NUM_EXAMPLES)[:steps * BATCH]
  return tf.data.Dataset.from_tensor_slices(
      {"index": order.astype(np.int64), "image": images[order]}).batch(BATCH, drop_remainder=True)


def test_one_step_on_one_and_two_replicas_agree(strategies):
  images = _data()
  labels = np.stack([np.arange(NUM_EXAMPLES) % k for k in HEADS])
  results = {}
  for name, strategy in strategies.items():
    model = _model(strategy)
    model.label_state.assign(labels, [np.zeros(k) for k in HEADS])
    history = model.fit(_train_batches(images, 1), epochs=1, verbose=0)
    results[name] = (history.history["loss"][0], [np.asarray(w) for w in model.get_weights()])
  loss_one, weights_one = results["one"]
  loss_two, weights_two = results["two"]
  assert loss_one == pytest.approx(loss_two, abs=1e-5)
  assert len(weights_one) == len(weights_two)
  for a, b in zip(weights_one, weights_two):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def _clustered_images(num_examples):
  """Noisy copies of 4 prototype images: data with structure, so predictions are not flat."""
  rng = np.random.default_rng(0)
  prototypes = rng.normal(size=(4,) + SHAPE)
  return (prototypes[np.arange(num_examples) % 4]
          + 0.3 * rng.normal(size=(num_examples,) + SHAPE)).astype(np.float32)


def test_label_pass_on_two_replicas_equals_one(strategies):
  """The label pass runs on every replica (each its share of a global batch), and a last batch that
  does not split evenly (50 = 3 x 16 + 2: one replica gets an empty share) is gathered by index."""
  num_examples = 50
  images = _clustered_images(num_examples)
  order = np.random.default_rng(2).permutation(num_examples)
  label_pass = tf.data.Dataset.from_tensor_slices(
      {"index": order.astype(np.int64), "image": images[order]}).batch(BATCH)
  log_probs = {}
  for name, strategy in strategies.items():
    keras.utils.set_random_seed(0)
    with strategy.scope():
      model = SelaModel("resnet18", SHAPE, HEADS, num_examples, name="sela")
      model.build()
    callback = callbacks_lib.SelfLabelCallback(label_pass, num_examples, 10.0, steps=[0], verbose=0)
    callback.set_model(model)
    log_probs[name] = callback.collect_log_probs()
  for t, k in enumerate(HEADS):
    assert log_probs["two"][t].shape == (num_examples, k)
    np.testing.assert_allclose(log_probs["two"][t], log_probs["one"][t], atol=1e-5, rtol=0)
  # The independent check: the model's own outputs, in example order.
  expected = model(images, training=False)
  for t in range(len(HEADS)):
    np.testing.assert_allclose(log_probs["two"][t], tf.nn.log_softmax(expected[t]).numpy(), atol=1e-5)


def test_short_run_gives_the_same_labels_on_one_and_two_replicas(strategies):
  """Labels at the start and again after 4 training steps agree on 1 and 2 replicas.

  The two runs drift apart in float32 rounding, and BatchNorm over batches of 16 amplifies the drift
  (at learning rate 0.1 the log-probs differ by 0.2 after 4 steps; at 0.01 by 1e-4): the short run
  uses 0.01.
  """
  images = _clustered_images(NUM_EXAMPLES)

  def label_pass(pass_index):
    del pass_index
    return tf.data.Dataset.from_tensor_slices(
        {"index": np.arange(NUM_EXAMPLES, dtype=np.int64), "image": images}).batch(BATCH)

  labels = {}
  for name, strategy in strategies.items():
    model = _model(strategy, learning_rate=0.01)
    # lambda = 1: a well-conditioned transport problem, solved to 1e-6 on both, so that the labels
    # depend on the networks' predictions, not on where two not-quite-converged solves stopped.
    callback = callbacks_lib.SelfLabelCallback(label_pass, NUM_EXAMPLES, 1.0, steps=[0, 4],
                                               labeller_options={"tol": 1e-6, "dtype": "float64",
                                                                 "max_iters": 20000},
                                               verbose=0)
    model.fit(_train_batches(images, 4).repeat(), epochs=2, steps_per_epoch=4, callbacks=[callback],
              verbose=0)
    assert int(model.label_state.num_labellings.numpy()) == 2
    labels[name] = model.label_state.current_labels()
  np.testing.assert_array_equal(labels["one"], labels["two"])
  # Not trivially equal: the second labelling moved some labels away from the first one's.
  assert callback.last_metrics["selabel_changed"] > 0
