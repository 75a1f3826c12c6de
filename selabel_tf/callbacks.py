"""Keras callbacks of SeLa: self-labelling at scheduled training steps.

`SelfLabelCallback` drops into any `model.fit` whose model returns per-head logits (a list of [B, K_t]),
given a dataset of {"index", "image"} batches for the labelling pass. At each scheduled step it
1. runs one pass over the data (augmented by default, as in the paper, sec. 3.4) and collects each
   head's log-probabilities by example index, averaged over `num_passes` passes;
2. runs the XLA labeller, warm-started from the last labelling's alpha;
3. stores the labels (and alpha, and the schedule position) in a `SelfLabelState`.

With `SelaModel` the state is the model's own (`model.label_state`): its weights are checkpointed with
the model. With a model of your own, the callback makes a state; `with_self_labels(dataset, state)` turns
{"index", "image"} batches into (image, labels) for a plain `compile(loss=...)`.
"""

import dataclasses
import logging
import math
import os
import time
from typing import Callable, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from selabel_tf import distribution
from selabel_tf import inference
from selabel_tf import label_store as label_store_lib
from selabel_tf import labeller as sinkhorn_labeller
from selabel_tf import schedule as schedule_lib
from selabel_tf.modeling.sela import SelfLabelState

logger = logging.getLogger(__name__)

LABELLERS = ("sinkhorn", "kmeans")
# Which heads a labelling re-assigns: every head, or one head in turn (head = labellings done mod T, as
# the official CIFAR code's head = epoch mod T) while the others keep their labels.
RELABEL_HEADS = ("all", "cyclic")
# Where the Sinkhorn-Knopp labelling holds the label pass: "gathered" (every worker holds all N, as
# one process would) or "sharded" (each replica keeps its own examples; `assign_labels_sharded`, only
# [K] vectors cross replicas per iteration, the int32 labels are gathered once at the end); "auto":
# sharded under a strategy with more than one worker.
LABEL_SHARDING = ("auto", "gathered", "sharded")


def with_self_labels(dataset: tf.data.Dataset, state: SelfLabelState) -> tf.data.Dataset:
  """Maps {"index", "image"} batches to (image, (labels_0, ..., labels_{T-1})) from `state`.

  The labels are read when each batch is made, so a labelling takes effect from the next batch on.
  """
  # A tuple: tf.data would stack a list of tensors into one tensor.
  return dataset.map(lambda batch: (batch["image"], tuple(state.lookup(batch["index"]))))


class SelfLabelCallback(keras.callbacks.Callback):
  """Re-assigns the self-labels at the scheduled training steps (paper Step 2).

  Args:
    label_pass: a dataset of {"index", "image"} batches covering every example once, or a callable
      `pass_index -> dataset` (for several averaged passes with different augmentations).
    num_examples: N.
    lam: lambda of the labeller (paper: 10 on CIFAR/SVHN, 25 on ImageNet).
    steps: the training steps before which to label (see `schedule.labelling_steps`); counted by the
      optimizer's `iterations`, so a restored run continues the schedule.
    state: where the labels live; default: a new state when `num_clusters` is given (read it as
      `callback.state`), else `model.label_state` (SelaModel).
    num_clusters: K per head, for a model of your own (no `label_state`).
    num_passes: label passes averaged (P = E_t[log softmax]).
    labeller: "sinkhorn" (the paper: Sinkhorn-Knopp on the heads' log-probabilities, `lam`) or
      "kmeans" (the paper's Table 8 baseline: K-means per head on the model's `kmeans_layer`,
      DeepCluster-style, see `selabel_tf.kmeans`; the model must have a `features(images)` method
      returning a dict with that key, as `SelaModel` does; `lam` is not used).
    labeller_options: keyword arguments for `labeller.assign_labels` (tol, max_iters, balance, seed,
      storage_dtype, ...), or for `kmeans.assign_labels_kmeans` (preprocessing, pca_dim,
      num_iterations, seed).
    kmeans_layer: the key of `model.features(images)` that K-means reads (the K-means labeller and
      cold start), flattened per example: "features" (the default: the vector the heads read) or,
      for `SelaModel`, a probe layer such as the backbone's embedding
      (`backbones.embedding_layer(architecture)`, "pool5" for AlexNet).
    cold_start_labeller: the labeller of the first `cold_start_labellings` labellings (the first
      without a warm start: the untrained network); None (the default): `labeller`. "kmeans" starts
      from K-means on the untrained network's features, a balanced-enough first labelling where the
      argmax of an untrained network's flat Q collapses; the later labellings are `labeller`'s.
      K-means then uses `cold_start_options`.
    cold_start_labellings: how many labellings, from the first, `cold_start_labeller` does (default
      1); e.g. 2 with "kmeans": K-means at the start and once more on the network trained on its
      labels, `labeller` from the third on (each labelling relabels the heads `relabel_heads` says:
      with "cyclic", T gives every head one K-means labelling).
    cold_start_options: keyword arguments of `kmeans.assign_labels_kmeans` for a K-means cold start
      (default: seed 0).
    relabel_heads: "all" (every head at every labelling) or "cyclic" (one head per labelling, head
      m mod T at the m-th, 0-based; the other heads' labels and alpha stay bitwise as they were).
    cold_start_balance: the labeller's `balance` for a labelling without a warm start (the first of a
      run, on the untrained network); None (the default) keeps `labeller_options`' balance. An
      untrained network's Q is nearly flat and its argmax collapses (on Fashion-MNIST at step 0 the
      largest of 10 clusters held 50,176 of 60,000 examples); "sample" draws each label from q(k|n)
      instead and splits the examples about equally, but the default job then ended with a lower NMI
      (0.28 against 0.36, one run each), so the paper's argmax stays the default.
    label_model: the model the label pass runs (default: the trained model), with the trained model's
      weights copied into it before each pass, so it must have the same weights in the same order:
      e.g. `SelaModel.with_dtype_policy("mixed_bfloat16")` for a mixed-precision pass while training
      in float32.
    label_store: what the label pass keeps for the Sinkhorn-Knopp labeller: "log_probs" (every head's
      [N, K_t] float32) or "features" (the model's "features" vector once, [N, D] in `feature_dtype`,
      each head's log-probabilities computed from it when that head is labelled: for many heads of
      large K, e.g. ImageNet's 3000 x 10; see `selabel_tf.label_store`). "features" needs a model
      with `features(images)` and `linear_heads()` (as `SelaModel`) and `num_passes=1`.
    feature_dtype: dtype of the stored features with label_store="features".
    feature_dir: with label_store="features", a local directory in which the label pass keeps the
      features in a file (`label_store.FeatureFile`, removed after each labelling) rather than in
      memory: the process then holds one head's kernel, not the features too (None: in memory). For
      a gathered label pass (a sharded one keeps each replica's share on its device).
    matmul_dtype: dtype of the inputs of the heads' product with label_store="features" ("bfloat16":
      accumulated in float32, fast on hardware with bfloat16 units).
    label_sharding: "auto", "gathered" or "sharded" (see `LABEL_SHARDING`; the K-means labeller and
      balance="exact" always gather).
    log_dir: TensorBoard directory for the labelling metrics (None: Keras logs and the console only).
    sheet_images: uint8 [N, H, W, C] (C = 1 or 3), the examples in index order: with `log_dir`, each
      labelling also logs a contact sheet per relabelled head (image summary "selabel_clusters/head_t":
      a row per cluster, its most confident images by the head's probability of its new label; K-means
      labels in index order) of the first `sheet_clusters` clusters.
    sheet_clusters: how many clusters the TensorBoard sheets show.
    class_labels: int [N], the true class of each example in index order, where known (None: not
      known). A diagnostic only, never read by the labellers: each labelling then adds the NMI and ARI
      of every relabelled head's new labels against these classes to its line of this module's logger
      (INFO), to TensorBoard ("selabel_nmi/head_t", "selabel_ari/head_t") and to `labelling_records`,
      so that a run shows which labelling gains or loses the clusters.
    verbose: 0 silent, 1 progress bars for the label pass.

  Attributes:
    labelling_records: one dict per labelling run by this callback object (not those before a
      restart): "labelling" (1-based count of the run's labellings), "step", "labeller", "heads",
      "seconds", "changed" (the fraction of each relabelled head's labels that changed), and with
      `class_labels` "nmi" and "ari" (one per relabelled head, in the order of "heads").
  """

  def __init__(self,
               label_pass: Union[tf.data.Dataset, Callable[[int], tf.data.Dataset]],
               num_examples: int,
               lam: float,
               steps: Sequence[int],
               *,
               state: Optional[SelfLabelState] = None,
               num_clusters: Optional[Sequence[int]] = None,
               num_passes: int = 1,
               labeller: str = "sinkhorn",
               labeller_options: Optional[dict] = None,
               relabel_heads: str = "all",
               cold_start_labeller: Optional[str] = None,
               cold_start_options: Optional[dict] = None,
               cold_start_balance: Optional[str] = None,
               cold_start_labellings: int = 1,
               kmeans_layer: str = "features",
               label_model: Optional[keras.Model] = None,
               label_store: str = "log_probs",
               feature_dtype: str = "bfloat16",
               feature_dir: Optional[str] = None,
               matmul_dtype: str = "float32",
               label_sharding: str = "auto",
               log_dir: Optional[str] = None,
               sheet_images: Optional[np.ndarray] = None,
               sheet_clusters: int = 8,
               class_labels: Optional[np.ndarray] = None,
               verbose: int = 1):
    super().__init__()
    if num_passes < 1:
      raise ValueError(f"num_passes must be >= 1, got {num_passes}")
    self.label_pass = label_pass
    self.num_examples = int(num_examples)
    self.lam = float(lam)
    self.steps = np.asarray(sorted(set(int(s) for s in steps)), np.int64)
    self.num_clusters = None if num_clusters is None else tuple(num_clusters)
    if state is None and self.num_clusters is not None:
      state = SelfLabelState(self.num_examples, self.num_clusters, name="label_state")
    self.state = state
    self.num_passes = num_passes
    if labeller not in LABELLERS:
      raise ValueError(f"SelfLabelCallback: labeller must be one of {LABELLERS}, got {labeller!r}")
    self.labeller = labeller
    if cold_start_labeller is not None and cold_start_labeller not in LABELLERS:
      raise ValueError(f"SelfLabelCallback: cold_start_labeller must be None or one of {LABELLERS}, got "
                       f"{cold_start_labeller!r}")
    if labeller == "kmeans" and cold_start_labeller not in (None, "kmeans"):
      raise ValueError("SelfLabelCallback: with labeller='kmeans' the cold start is K-means too; got "
                       f"cold_start_labeller={cold_start_labeller!r}")
    self.cold_start_labeller = cold_start_labeller or labeller
    if isinstance(cold_start_labellings, (bool, np.bool_)) or not isinstance(
        cold_start_labellings, (int, np.integer)) or cold_start_labellings < 1:
      raise ValueError(f"SelfLabelCallback: cold_start_labellings must be an int >= 1, got "
                       f"{cold_start_labellings!r}")
    self.cold_start_labellings = int(cold_start_labellings)
    self.kmeans_layer = str(kmeans_layer)
    self.cold_start_options = dict(cold_start_options or {})
    self.labeller_options = dict(labeller_options or {})
    if relabel_heads not in RELABEL_HEADS:
      raise ValueError(f"SelfLabelCallback: relabel_heads must be one of {RELABEL_HEADS}, got "
                       f"{relabel_heads!r}")
    self.relabel_heads = relabel_heads
    if cold_start_balance is not None and cold_start_balance not in sinkhorn_labeller.BALANCE_MODES:
      raise ValueError(f"SelfLabelCallback: cold_start_balance must be None or one of "
                       f"{sinkhorn_labeller.BALANCE_MODES}, got {cold_start_balance!r}")
    self.cold_start_balance = cold_start_balance
    self.label_model = label_model
    if label_store not in label_store_lib.STORES:
      raise ValueError(f"SelfLabelCallback: label_store must be one of {label_store_lib.STORES}, got "
                       f"{label_store!r}")
    if feature_dtype not in label_store_lib.FEATURE_DTYPES:
      raise ValueError(f"SelfLabelCallback: feature_dtype must be one of {label_store_lib.FEATURE_DTYPES}, "
                       f"got {feature_dtype!r}")
    if matmul_dtype not in label_store_lib.MATMUL_DTYPES:
      raise ValueError(f"SelfLabelCallback: matmul_dtype must be one of {label_store_lib.MATMUL_DTYPES}, "
                       f"got {matmul_dtype!r}")
    if label_store == "features" and num_passes != 1:
      raise ValueError(f"SelfLabelCallback: label_store='features' keeps one pass's features; "
                       f"num_passes={num_passes} averages log-probabilities: use one or the other")
    if feature_dir is not None and label_store != "features":
      raise ValueError(f"SelfLabelCallback: feature_dir={feature_dir!r} keeps the features of "
                       f"label_store='features' in a file; label_store is {label_store!r}")
    if feature_dir is not None and not os.path.isdir(feature_dir):
      raise ValueError(f"SelfLabelCallback: feature_dir={feature_dir!r} is not a directory")
    if feature_dir is not None and label_sharding == "sharded":
      raise ValueError("SelfLabelCallback: feature_dir keeps a gathered label pass in a file; "
                       "label_sharding='sharded' keeps each replica's share on its device")
    self.label_store, self.feature_dtype, self.matmul_dtype = label_store, feature_dtype, matmul_dtype
    self.feature_dir = feature_dir
    if label_sharding not in LABEL_SHARDING:
      raise ValueError(f"SelfLabelCallback: label_sharding must be one of {LABEL_SHARDING}, got "
                       f"{label_sharding!r}")
    self.label_sharding = label_sharding
    self.verbose = verbose
    self.last_metrics = {}
    self._writer = tf.summary.create_file_writer(log_dir) if log_dir else None
    if sheet_images is not None and len(sheet_images) != self.num_examples:
      raise ValueError(f"SelfLabelCallback: sheet_images holds {len(sheet_images)} images, not the "
                       f"num_examples={self.num_examples}")
    self.sheet_images = sheet_images
    self.sheet_clusters = int(sheet_clusters)
    self.class_labels = None
    if class_labels is not None:
      class_labels = np.asarray(class_labels)
      if (class_labels.shape != (self.num_examples,) or not np.issubdtype(class_labels.dtype, np.integer)
          or (class_labels.size and class_labels.min() < 0)):
        minimum = (f", minimum {class_labels.min()}" if class_labels.size
                   and np.issubdtype(class_labels.dtype, np.number) else "")
        raise ValueError(f"SelfLabelCallback: class_labels must be non-negative ints of shape "
                         f"({self.num_examples},) (num_examples), got {class_labels.dtype} "
                         f"{class_labels.shape}{minimum}")
      self.class_labels = class_labels
    self.labelling_records = []

  @classmethod
  def with_schedule(cls, label_pass, num_examples, lam, *, total_steps, num_labellings,
                    spacing="linear", **kwargs):
    """A callback labelling `num_labellings` times over `total_steps` (the paper's #opts)."""
    steps = schedule_lib.labelling_steps(total_steps, num_labellings, spacing)
    return cls(label_pass, num_examples, lam, steps, **kwargs)

  def set_model(self, model):
    super().set_model(model)
    if self.state is None:
      self.state = getattr(model, "label_state", None)
    if self.state is None:
      raise ValueError("SelfLabelCallback: the model has no label_state; pass num_clusters=(K_0, ...)")
    if "kmeans" in (self.labeller, self.cold_start_labeller) and not callable(
        getattr(self.label_model or model, "features", None)):
      which = "labeller" if self.labeller == "kmeans" else "cold_start_labeller"
      raise ValueError(f"SelfLabelCallback: {which}='kmeans' needs a model with a features(images) method "
                       f"returning a dict with its kmeans_layer={self.kmeans_layer!r} (e.g. SelaModel)")
    if self.label_store == "features" and not (
        callable(getattr(self.label_model or model, "features", None))
        and callable(getattr(self.label_model or model, "linear_heads", None))):
      raise ValueError("SelfLabelCallback: label_store='features' needs a model with features(images) "
                       "and linear_heads() methods (e.g. SelaModel)")
    if self.state.num_examples != self.num_examples:
      raise ValueError(f"SelfLabelCallback: num_examples={self.num_examples} but the label state holds "
                       f"{self.state.num_examples}")

  def labeller_due(self) -> str:
    """The labeller of the next labelling: `cold_start_labeller` for the first `cold_start_labellings`,
    else `labeller`."""
    return (self.cold_start_labeller if self.state.labellings_done() < self.cold_start_labellings
            else self.labeller)

  def sharded(self, labeller: Optional[str] = None) -> bool:
    """Whether the next labelling (by `labeller`) keeps the label pass sharded over the replicas."""
    if (labeller or self.labeller_due()) != "sinkhorn" or self.labeller_options.get("balance") == "exact":
      return False
    if self.label_sharding == "auto":
      return distribution.num_workers(self.model.distribute_strategy) > 1
    return self.label_sharding == "sharded"

  def _pass_runner(self, labeller: str) -> inference.IndexedPass:
    """The pass over the label-pass data on every replica, in inference mode: per example each head's
    log softmax (float32), or, for the K-means labeller, the model's `kmeans_layer` flattened.

    (Keras' predict_on_batch is not used: under a MirroredStrategy it gives every replica the whole
    batch and returns the outputs of all of them.) The forward runs in the dtype policy of the model
    (or `label_model`), so a mixed_bfloat16 / mixed_float16 model labels at its mixed-precision
    speed; the log softmax is taken in float32.
    """
    model = self.label_model or self.model
    if getattr(self, "_passes", None) is None or self._pass_model is not model:
      self._passes, self._pass_model = {}, model
    kind = "kmeans" if labeller == "kmeans" else self.label_store
    sharded = self.sharded(labeller)
    if (kind, sharded) not in self._passes:
      if kind in ("kmeans", "features"):  # K-means reads the features in float32
        dtype = tf.float32 if kind == "kmeans" else tf.as_dtype(self.feature_dtype)
        layer = self.kmeans_layer if kind == "kmeans" else "features"

        def replica_step(batch):
          outputs = model.features(batch["image"], training=False)
          if layer not in outputs:  # raised while tracing, before any pass
            needs = f"kmeans_layer={layer!r}" if kind == "kmeans" else "label_store='features'"
            raise ValueError(f"SelfLabelCallback: {needs} needs the key {layer!r}, not one of the model's "
                             f"features(images) keys {sorted(outputs)}")
          values = outputs[layer]  # flattened per example, its size static
          return batch["index"], tf.cast(keras.ops.reshape(values, (-1, math.prod(values.shape[1:]))), dtype)
      else:

        def replica_step(batch):
          logits = model(batch["image"], training=False)
          logits = logits if isinstance(logits, (list, tuple)) else [logits]
          return batch["index"], [tf.nn.log_softmax(tf.cast(head, tf.float32)) for head in logits]

      runner = inference.ShardedPass if sharded else inference.IndexedPass
      self._passes[(kind, sharded)] = runner(self.model.distribute_strategy, replica_step)
    return self._passes[(kind, sharded)]

  def _due(self) -> bool:
    done = self.state.labellings_done()
    if done >= len(self.steps):
      return False
    return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) >= self.steps[done]

  def on_train_batch_begin(self, batch, logs=None):
    if self._due():
      self.relabel()

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs.update(self.last_metrics)

  def collect_log_probs(self, labeller: Optional[str] = None):
    """One pass (or the average of `num_passes`) over the label-pass data, by example index: T arrays
    [N, K_t] float32 of log softmax per head (Sinkhorn-Knopp), or with label_store="features" a
    `label_store.LinearHeads` of every head over the stored features, or the `kmeans_layer` flattened,
    float32 [N, D] (K-means).

    The pass is spread over the model's replicas (each runs its share of every global batch); the
    results of all replicas, of all workers, are gathered and stored by example index, so every worker
    holds all of them and computes the same labels. When the labelling is `sharded`, nothing is
    gathered: it returns a `ShardedLabelPass` (each replica's indices and outputs, on its device).
    """
    if self.label_model is not None:
      self._copy_weights_to_label_model()
    labeller = labeller or self.labeller
    run_pass = self._pass_runner(labeller)
    if self.sharded(labeller):
      if self.feature_dir is not None:  # (the constructor allows it only with label_store="features")
        raise ValueError(f"SelfLabelCallback: feature_dir={self.feature_dir!r} keeps a gathered label "
                         "pass in a file, but this labelling is sharded over the workers (label_sharding="
                         f"{self.label_sharding!r}): pass label_sharding='gathered', or no feature_dir")
      if self.num_passes != 1:
        raise ValueError(f"SelfLabelCallback: num_passes={self.num_passes} averages each example's "
                         "log-probabilities across passes, which a sharded labelling cannot (an example "
                         "may be on another replica in each pass); use num_passes=1 or "
                         "label_sharding='gathered'")
      ds = self.label_pass(0) if callable(self.label_pass) else self.label_pass
      index, outputs = run_pass(ds, self.num_examples, verbose=self.verbose,
                                description="SelfLabelCallback: label pass (sharded)")
      weights = (self.label_model or self.model).linear_heads() if self.label_store == "features" else None
      return ShardedLabelPass(index, outputs, weights, self.matmul_dtype)
    total = None
    # K-means reads the features whole, in memory; the Sinkhorn-Knopp labeller reads them part by part.
    in_file = self.feature_dir is not None and labeller == "sinkhorn"
    allocate = label_store_lib.FeatureFile.allocator(self.feature_dir) if in_file else None
    for pass_index in range(self.num_passes):
      ds = self.label_pass(pass_index) if callable(self.label_pass) else self.label_pass
      outputs = run_pass(ds, self.num_examples, verbose=self.verbose, allocate=allocate,
                         description=f"SelfLabelCallback: label pass {pass_index + 1}/{self.num_passes}")
      if total is None:
        total = outputs
      else:
        total = tf.nest.map_structure(np.add, total, outputs)
    if self.num_passes > 1:
      total = tf.nest.map_structure(lambda value: value / np.float32(self.num_passes), total)
    if self.label_store == "features" and labeller == "sinkhorn":
      total = label_store_lib.LinearHeads.of_model(
          self.label_model or self.model, total, range(len(self.state.num_clusters)),
          matmul_dtype=self.matmul_dtype)
    return total

  def _copy_weights_to_label_model(self):
    source, target = self.model.weights, self.label_model.weights
    if len(source) != len(target) or any(tuple(s.shape) != tuple(t.shape)
                                         for s, t in zip(source, target)):
      raise ValueError(f"SelfLabelCallback: label_model {self.label_model.name!r} does not have the "
                       f"weights of the trained model {self.model.name!r} ({len(target)} vs "
                       f"{len(source)} weights, or different shapes)")
    for s, t in zip(source, target):
      t.assign(s)

  def heads_due(self) -> list:
    """The heads the next labelling re-assigns (see `relabel_heads`)."""
    num_heads = len(self.state.num_clusters)
    if self.relabel_heads == "cyclic":
      return [self.state.labellings_done() % num_heads]
    return list(range(num_heads))

  def _log_sheets(self, labels, heads, log_probs, step):
    """The contact sheets of the relabelled heads, as image summaries (inside the writer's context)."""
    from selabel_tf import contact_sheets  # pylint: disable=g-import-not-at-top
    for t in heads:
      num_clusters = self.state.num_clusters[t]
      if log_probs is None:
        confidence = np.zeros(self.num_examples, np.float32)
      elif isinstance(log_probs, label_store_lib.LinearHeads):
        confidence = np.exp(log_probs[t].label_log_probs(labels[t]))
      else:
        confidence = np.exp(log_probs[t][np.arange(self.num_examples), labels[t]])
      sheet = contact_sheets.overview(self.sheet_images, labels[t], confidence, num_clusters,
                                      clusters=range(min(self.sheet_clusters, num_clusters)))
      tf.summary.image(f"selabel_clusters/head_{t}", sheet[None], step=step)

  def relabel(self):
    """Runs the label pass and the labeller now, and stores the new labels of the heads due."""
    start = time.perf_counter()
    labeller = self.labeller_due()
    pass_outputs = self.collect_log_probs(labeller)  # log-probs per head, or for K-means the features
    try:
      return self._relabel_from(pass_outputs, labeller, start)
    finally:
      if isinstance(pass_outputs, label_store_lib.LinearHeads):
        pass_outputs.close()  # a FeatureFile's disk space

  def _relabel_from(self, pass_outputs, labeller, start):
    pass_seconds = time.perf_counter() - start
    previous = self.state.current_labels()
    heads = self.heads_due()
    num_clusters = [self.state.num_clusters[t] for t in heads]
    if labeller == "kmeans":
      from selabel_tf import kmeans  # pylint: disable=g-import-not-at-top
      options = dict(self.labeller_options if self.labeller == "kmeans" else self.cold_start_options)
      options["seed"] = options.get("seed", 0) + heads[0]  # a head keeps its seed stream when cyclic
      result = kmeans.assign_labels_kmeans(pass_outputs, num_clusters, **options)
      new_labels, new_log_alpha = result.labels, [np.zeros(k) for k in num_clusters]
      solver_metrics = {"selabel_kmeans_inertia": float(np.mean(result.inertia))}
      solver_log = f"K-means inertia {np.round(result.inertia, 4).tolist()}"
    else:
      warm_start = self.state.warm_start()
      options = dict(self.labeller_options)
      if warm_start is None and self.cold_start_balance is not None:
        options["balance"] = self.cold_start_balance
      warm_start = None if warm_start is None else [warm_start[t] for t in heads]
      if isinstance(pass_outputs, ShardedLabelPass):
        result = pass_outputs.assign_labels(self.model.distribute_strategy, heads, self.lam,
                                            self.num_examples, warm_start=warm_start, **options)
      else:
        result = sinkhorn_labeller.assign_labels([pass_outputs[t] for t in heads], self.lam,
                                                 warm_start=warm_start, **options)
      new_labels, new_log_alpha = result.labels, result.log_row_scale
      solver_metrics = {"selabel_iterations": float(np.mean(result.iterations)),
                        "selabel_marginal_error": float(np.max(result.marginal_error)),
                        "selabel_exchanged_bytes": float(result.exchanged_bytes)}
      solver_log = (f"Sinkhorn iterations {result.iterations.tolist()}, marginal error "
                    f"{solver_metrics['selabel_marginal_error']:.3g}")
      if isinstance(pass_outputs, ShardedLabelPass):
        solver_log += f", sharded over {self.model.distribute_strategy.num_replicas_in_sync} replicas, " \
                      f"{result.exchanged_bytes / 2**20:.2f} MiB exchanged per replica"
    labels = previous.copy()
    log_alpha = [None] * len(self.state.num_clusters)
    for i, t in enumerate(heads):
      labels[t], log_alpha[t] = new_labels[i], new_log_alpha[i]
    self.state.assign(labels, log_alpha, heads=heads)
    seconds = time.perf_counter() - start
    sizes = [np.bincount(labels[t], minlength=self.state.num_clusters[t]) for t in heads]
    changed = np.mean(labels != previous, axis=1)  # per head (every head has N labels)
    metrics = {
        **solver_metrics,
        "selabel_seconds": seconds,
        "selabel_pass_seconds": pass_seconds,
        "selabel_changed": float(np.mean(changed)),
        "selabel_smallest_cluster": float(min(s.min() for s in sizes)),
        "selabel_largest_cluster": float(max(s.max() for s in sizes)),
    }
    step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
    record = {"labelling": self.state.labellings_done(), "step": step, "labeller": labeller,
              "heads": list(heads), "seconds": seconds,
              "changed": [float(changed[t]) for t in heads]}
    truth_log = ""
    if self.class_labels is not None:
      from selabel_tf.evaluation import cluster_metrics  # pylint: disable=g-import-not-at-top
      agreement = [cluster_metrics.nmi_ari(labels[t], self.class_labels) for t in heads]
      record["nmi"] = [a["nmi"] for a in agreement]
      record["ari"] = [a["ari"] for a in agreement]
      truth_log = (f", against the classes NMI {np.round(record['nmi'], 3).tolist()} ARI "
                   f"{np.round(record['ari'], 3).tolist()}")
    self.labelling_records.append(record)
    self.last_metrics = metrics
    logger.info(
        "self-labelling %d (%s, heads %s) at step %d: %.1f s (pass %.1f s), %s, labels changed per head "
        "%s, cluster sizes %d..%d%s",
        self.state.labellings_done(), labeller, heads, step, seconds,
        pass_seconds, solver_log, np.round(changed, 4).tolist(),
        metrics["selabel_smallest_cluster"], metrics["selabel_largest_cluster"], truth_log)
    if self._writer is not None:
      with self._writer.as_default():
        for name, value in metrics.items():
          tf.summary.scalar(name, value, step=step)
        for t in range(labels.shape[0]):
          tf.summary.scalar(f"selabel_changed/head_{t}", float(changed[t]), step=step)
        for key in ("nmi", "ari"):
          for t, value in zip(heads, record.get(key, ())):
            tf.summary.scalar(f"selabel_{key}/head_{t}", value, step=step)
        if self.sheet_images is not None:
          self._log_sheets(labels, heads, None if labeller == "kmeans" or isinstance(
              pass_outputs, ShardedLabelPass) else pass_outputs, step)
        self._writer.flush()
    return result


class ShardedLabelPass:
  """A label pass kept where it ran: each replica's example indices and its outputs, as distributed
  values of the strategy: log-probs per head, or, with `head_weights` ([(kernel, bias)] per head,
  `SelaModel.linear_heads()`), the features the heads are computed from."""

  def __init__(self, index, outputs, head_weights=None, matmul_dtype: str = "float32"):
    self.index, self.outputs = index, outputs
    self.head_weights, self.matmul_dtype = head_weights, matmul_dtype

  def assign_labels(self, strategy, heads: Sequence[int], lam: float, num_examples: int, **options):
    """`labeller.assign_labels_sharded` of the heads `heads`; the labels come back by example index.

    The labels are gathered once (int32) with the replicas' indices, which are checked to cover
    [0, num_examples) once each.
    """
    if self.head_weights is not None:
      providers = [lambda t=t: label_store_lib.per_replica_log_probs(
          strategy, self.outputs, *self.head_weights[t], matmul_dtype=self.matmul_dtype) for t in heads]
    else:
      providers = [lambda t=t: strategy.run(lambda v: v[t], args=(self.outputs,)) for t in heads]
    result = sinkhorn_labeller.assign_labels_sharded(strategy, providers, lam, **options)
    gathered = strategy.gather(self.index, axis=0).numpy()
    inference.ShardedPass.check_indices(gathered, num_examples, "SelfLabelCallback: sharded label pass")
    labels = np.empty_like(result.labels)
    labels[:, gathered] = result.labels
    log_col_scale = []
    for values in result.log_col_scale:
      by_index = np.empty_like(values)
      by_index[gathered] = values
      log_col_scale.append(by_index)
    index_bytes = gathered.nbytes if strategy.num_replicas_in_sync > 1 else 0
    return dataclasses.replace(result, labels=labels, log_col_scale=tuple(log_col_scale),
                               exchanged_bytes=result.exchanged_bytes + index_bytes)
