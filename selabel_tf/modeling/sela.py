"""The SeLa model: a backbone, T linear heads, and the self-labels it trains against.

`SelfLabelState` holds what self-labelling must carry across restarts as non-trainable weights: the
labels [T, N], each head's log alpha (the labeller's warm start, paper sec. 3.1) and how many labellings
are done (the schedule position). As weights of the model they are saved by `model.save_weights`, so
checkpoints and `keras.callbacks.BackupAndRestore` carry them with the network and the optimizer.

`SelaModel.compute_loss` looks the labels of a batch up by example index and minimises the mean over heads
of the cross-entropy (paper eq. 1 with T heads, sec. 3.5), through Keras' own train step, so that
distribution, loss scaling and metrics are Keras'.
"""

from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from selabel_tf import distribution
from selabel_tf.modeling import backbones
from selabel_tf.modeling import heads as heads_lib


@keras.saving.register_keras_serializable(package="selabel_tf")
class SelfLabelState(keras.layers.Layer):
  """Self-labels and labeller state, as checkpointed non-trainable weights.

  Weights:
    labels_{t}: int32 [N], head t's label of each example; initially `initial_labels(N, K_t, seed, t)`,
      a random equipartition, as the official code starts.
    log_alpha_{t}: float32 [K_t], head t's log alpha from the last labelling.
    num_labellings: int32 scalar, labellings done so far (the schedule position).

  Args:
    num_examples: N.
    num_clusters: (K_0, ..., K_{T-1}).
    seed: seed of the initial labels (head t draws from the stream (seed, t)).
  """

  def __init__(self, num_examples: int, num_clusters: Sequence[int], seed: int = 0, **kwargs):
    super().__init__(trainable=False, **kwargs)
    self.num_examples = int(num_examples)
    self.num_clusters = tuple(int(k) for k in num_clusters)
    self.seed = int(seed)
    self.labels, self.log_alpha = [], []
    for t, k in enumerate(self.num_clusters):
      initial = initial_labels(self.num_examples, k, self.seed, t)
      self.labels.append(self.add_weight(
          name=f"labels_{t}", shape=(self.num_examples,), dtype="int32", trainable=False,
          initializer=lambda shape, dtype, initial=initial: tf.constant(initial, dtype)))
      self.log_alpha.append(self.add_weight(name=f"log_alpha_{t}", shape=(k,), dtype="float32",
                                            trainable=False, initializer="zeros"))
    self.num_labellings = self.add_weight(name="num_labellings", shape=(), dtype="int32",
                                          trainable=False, initializer="zeros")
    self.built = True

  def lookup(self, index):
    """Labels of the examples `index` (int [B]): a list of one int32 [B] tensor per head (a list, like
    the model's outputs, so that Keras matches targets to outputs)."""
    return [tf.gather(labels, index) for labels in self.labels]

  def assign(self, labels: np.ndarray, log_alpha: Sequence[np.ndarray],
             heads: Optional[Sequence[int]] = None):
    """Stores a labelling and counts it: labels int [T, N] and T log alpha vectors, of which only the
    rows of `heads` (default: all) are written; the other heads keep theirs."""
    for t in range(len(self.num_clusters)) if heads is None else heads:
      self.labels[t].assign(np.asarray(labels[t], np.int32))
      self.log_alpha[t].assign(np.asarray(log_alpha[t], np.float32))
    self.num_labellings.assign_add(1)

  def current_labels(self) -> np.ndarray:
    return np.stack([np.asarray(keras.ops.convert_to_numpy(v)) for v in self.labels])

  def labellings_done(self) -> int:
    return int(keras.ops.convert_to_numpy(self.num_labellings))

  def warm_start(self):
    """The log alpha vectors to continue from, or None before the first labelling."""
    if self.labellings_done() == 0:
      return None
    return [np.asarray(keras.ops.convert_to_numpy(v), np.float64) for v in self.log_alpha]

  def get_config(self):
    config = super().get_config()
    config.update(num_examples=self.num_examples, num_clusters=list(self.num_clusters), seed=self.seed)
    return config


def initial_labels(num_examples: int, num_clusters: int, seed: int, head: int = 0) -> np.ndarray:
  """A random equipartition, as the official code's initial self-labels: example index mod K, shuffled
  by a permutation drawn from the stream (seed, head). int32 [N]; every cluster holds floor(N/K) or
  ceil(N/K) examples."""
  rng = np.random.default_rng([int(seed), int(head)])
  return rng.permutation(np.arange(num_examples) % num_clusters).astype(np.int32)


@keras.saving.register_keras_serializable(package="selabel_tf")
class SelaModel(keras.Model):
  """Backbone + T heads, trained with cross-entropy against its own `label_state`.

  Inputs of `fit`: dicts {"index": int [B], "image": float [B, H, W, C]} (see selabel_tf.data.pipeline).
  `label_seed` seeds the initial random equipartition labels (`initial_labels`); `fc_batchnorm` and
  `fc_dropout` are `backbones.build_backbone`'s.
  `call(images)` returns the list of T logits [B, K_t], float32.
  """

  def __init__(self, architecture: str, image_shape: Sequence[int], num_clusters: Sequence[int],
               num_examples: int, label_seed: int = 0, fc_batchnorm: bool = False,
               fc_dropout: float = backbones.ALEXNET_DROPOUT, **kwargs):
    super().__init__(**kwargs)
    self.fc_batchnorm = bool(fc_batchnorm)
    self.fc_dropout = float(fc_dropout)
    self.label_seed = int(label_seed)
    self.architecture = architecture
    self.image_shape = tuple(int(d) for d in image_shape)
    self.num_clusters = tuple(int(k) for k in num_clusters)
    self.num_examples = int(num_examples)
    self.backbone = backbones.build_backbone(architecture, self.image_shape, fc_batchnorm=self.fc_batchnorm,
                                             fc_dropout=self.fc_dropout)
    self.heads = heads_lib.MultiHead(self.num_clusters, name="heads")
    self.label_state = SelfLabelState(self.num_examples, self.num_clusters, seed=self.label_seed,
                                      name="label_state")

  def build(self, input_shape=None):
    del input_shape
    self.heads.build(self.backbone.output["features"].shape)
    self.built = True

  def call(self, images, training=False):
    if isinstance(images, dict):  # a {"index", "image"} batch, as Keras passes it when building
      images = images["image"]
    features = self.backbone(images, training=training)["features"]
    return self.heads(features)

  def features(self, images, training=False):
    """The backbone's named activations (for probes) and "features"."""
    return self.backbone(images, training=training)

  def linear_heads(self) -> list:
    """[(kernel [D, K_t], bias [K_t])] per head: logits_t = features @ kernel + bias (float32), so that
    a label pass can keep the features alone (`selabel_tf.label_store.LinearHeads`)."""
    return [(head.kernel, head.bias) for head in self.heads.heads]

  def _targets(self, x, y):
    """The batch's self-labels where Keras has no targets: `fit`/`evaluate` batches are
    {"index", "image"} dicts, so `y` is None and the labels are looked up by index from `label_state`
    when the step runs (a labelling between batches applies from the next batch)."""
    if y is None and isinstance(x, dict) and "index" in x:
      # A no-op at step time (int64); when Keras builds the compiled loss and metrics under a strategy
      # from a replica-mean of the first batch, the index is float and only its shape matters.
      return self.label_state.lookup(tf.cast(x["index"], tf.int64))
    return y

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """Keras' build from the first batch, with the batch's replica-mean taken leaf by leaf.

    Keras 3's TF trainer (3.15) reduces the first distributed batch with one
    `strategy.reduce("MEAN", batch)` of the whole nest; MultiWorkerMirroredStrategy's collective reduce
    takes one tensor, so `fit` on {"index", "image"} batches failed there with "Attempt to convert a
    value ({'index': PerReplica..." (there is no public hook for this step). The same reduce, per leaf.
    """
    strategy = getattr(self, "_distribute_strategy", None)
    if strategy is None or iterator is None:
      return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
    for _, _, it in iterator:
      batch = next(it)
      data_batch = tf.nest.map_structure(
          lambda v: strategy.reduce("MEAN", v, axis=None)
          if isinstance(v, tf.distribute.DistributedValues) else v, batch)
      break
    return super()._maybe_symbolic_build(iterator=None, data_batch=data_batch)

  def train_step(self, data):
    """Keras' train step; under several workers its logs get a leading axis of 1.

    Keras 3's TF trainer (3.15) reduces a step's logs under MultiWorkerMirroredStrategy with a
    collective mean over axis 0, which fails on scalars ("Invalid reduction dimension 0 for input
    with 0 dimensions", tensorflow/tensorflow#72388); over [1]-shaped logs it is the mean across
    replicas, a scalar again.
    """
    logs = super().train_step(data)
    if distribution.num_workers(self.distribute_strategy) > 1:
      logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
    return super().compute_loss(x=x, y=self._targets(x, y), y_pred=y_pred,
                                sample_weight=sample_weight, training=training)

  def compute_metrics(self, x, y, y_pred, sample_weight=None):
    return super().compute_metrics(x, self._targets(x, y), y_pred, sample_weight=sample_weight)

  def compile_for_self_labelling(self, optimizer, **kwargs):
    """compile() with the paper's loss: the mean over heads of softmax cross-entropy."""
    num_heads = len(self.num_clusters)
    self.compile(
        optimizer=optimizer,
        # Named per head: Keras logs each head's loss under its own name.
        loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True, name=f"head_{t}_cross_entropy")
              for t in range(num_heads)],
        loss_weights=[1.0 / num_heads] * num_heads, **kwargs)

  def with_dtype_policy(self, dtype_policy: str) -> "SelaModel":
    """A new, built SelaModel of this configuration whose layers compute in `dtype_policy`.

    For a label pass in mixed precision ("mixed_bfloat16", "mixed_float16") while training in float32:
    give it to `SelfLabelCallback(label_model=...)`, which copies this model's weights into it before
    each pass. The heads compute in float32 in either (see `MultiHead`). Its variables are placed by
    the current strategy scope, like this model's.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(dtype_policy)
    try:
      config = {**self.get_config(), "name": f"{self.name}_{dtype_policy}"}
      twin = SelaModel.from_config(config)
      twin.build()
    finally:
      keras.mixed_precision.set_global_policy(previous)
    return twin

  def label_pass_twin(self, dtype_policy: str):
    """`with_dtype_policy(dtype_policy)`, or None where the label pass runs on this model itself:
    for "model" and for this model's own policy."""
    if dtype_policy in ("model", self.dtype_policy.name):
      return None
    return self.with_dtype_policy(dtype_policy)

  # Keras saves a layer's weights, not the states of its SeedGenerators (dropout's): without them a run
  # restored from a backup would draw the dropout masks of its first steps again, and a deterministic
  # run killed and resumed would not end where an uninterrupted one does. They are saved beside the
  # model's own variables ("seed_generator_i"); a file without them (an older one) leaves them as they are.
  _SEED_KEY = "seed_generator_"

  def seed_generator_states(self) -> list:
    """The states of every SeedGenerator in the model (the variables that are not weights), in order."""
    weights = {id(w) for w in self.weights}
    return [v for v in self.variables if id(v) not in weights]

  def save_own_variables(self, store):
    super().save_own_variables(store)
    for i, state in enumerate(self.seed_generator_states()):
      store[f"{self._SEED_KEY}{i}"] = state

  def load_own_variables(self, store):
    keys = list(store.keys())
    seeds = sorted((k for k in keys if k.startswith(self._SEED_KEY)), key=lambda k: int(k[len(self._SEED_KEY):]))
    super().load_own_variables({k: store[k] for k in keys if not k.startswith(self._SEED_KEY)})
    if not seeds:
      return
    states = self.seed_generator_states()
    if len(seeds) != len(states):
      raise ValueError(f"the weights file holds {len(seeds)} seed generator states, this model has "
                       f"{len(states)}")
    for key, state in zip(seeds, states):
      state.assign(store[key])

  def get_config(self):
    return {"architecture": self.architecture, "image_shape": list(self.image_shape),
            "num_clusters": list(self.num_clusters), "num_examples": self.num_examples,
            "label_seed": self.label_seed, "fc_batchnorm": self.fc_batchnorm,
            "fc_dropout": self.fc_dropout, "name": self.name}
