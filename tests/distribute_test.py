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


def _model(strategy):
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = SelaModel("resnet18", SHAPE, HEADS, NUM_EXAMPLES, name="sela")
    model.build()
    model.compile_for_self_labelling(keras.optimizers.SGD(0.1, momentum=0.9))
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


def test_short_run_gives_the_same_labels_on_one_and_two_replicas(strategies):
  images = _data()

  def label_pass(pass_index):
    del pass_index
    return tf.data.Dataset.from_tensor_slices(
        {"index": np.arange(NUM_EXAMPLES, dtype=np.int64), "image": images}).batch(BATCH)

  labels = {}
  for name, strategy in strategies.items():
    model = _model(strategy)
    # Labelling at the start: the label pass and labeller see identical networks on 1 and 2 replicas.
    # (A labelling after training steps sees logits that differ in the last float32 bits; with an
    # untrained network on noise, Q is so flat that those bits flip argmaxes, so it is not compared.)
    callback = callbacks_lib.SelfLabelCallback(label_pass, NUM_EXAMPLES, 10.0, steps=[0],
                                               labeller_options={"tol": 1e-3}, verbose=0)
    model.fit(_train_batches(images, 2).repeat(), epochs=2, steps_per_epoch=2, callbacks=[callback],
              verbose=0)
    assert int(model.label_state.num_labellings.numpy()) == 1
    labels[name] = model.label_state.current_labels()
  np.testing.assert_array_equal(labels["one"], labels["two"])
