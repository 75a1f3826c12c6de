"""The evaluation suite of a run: kNN, linear probes and cluster metrics, sharing one pass per split.

`train.run` adds `build_callbacks(...)` to its `fit`; `bin/evaluate` calls `evaluate_model(...)` on a
trained (or random-init) model. Both go through the same callbacks, so the numbers are computed the
same way.
"""

import dataclasses
import time
from typing import Dict, List, Optional, Tuple

import keras

from selabel_tf.data import sources
from selabel_tf.evaluation import callbacks as eval_callbacks
from selabel_tf.evaluation import probes as probes_lib


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
  """What the suite measures.

  Attributes:
    knn_ks: the kNN's numbers of neighbours.
    knn_layer: the activation the kNN reads (None: the backbone's embedding, see `KNNCallback`).
    probe_layers: the probed activations (empty: every probe layer of the backbone and "features").
    probe_mode: "cached" or "streamed" (see `LinearProbeCallback`).
    probe: the probes' optimisation.
    batch_size: global batch of the evaluation passes.
  """
  knn_ks: Tuple[int, ...] = (10, 50, 200)
  knn_layer: Optional[str] = None
  probe_layers: Tuple[str, ...] = ()
  probe_mode: str = "cached"
  probe: probes_lib.ProbeOptions = probes_lib.ProbeOptions()
  batch_size: int = 1024


def load_data(dataset: str, *, image_size: Optional[int], batch_size: int, train_split: str = "train",
              test_split: str = "test", data_dir: Optional[str] = None, imbalance: str = "none",
              subset: Optional[int] = None, test_subset: Optional[int] = None, seed: int = 0,
              **load_options) -> eval_callbacks.EvaluationData:
  """The labelled train split (as trained on, imbalance and subset included) and the test split (all of it,
  or a random `test_subset` of it, drawn with `seed`); image_size None: the images' own.

  Raises:
    ValueError: a split without class labels (nothing to evaluate against), naming it.
  """
  train, train_truth = sources.load(dataset, split=train_split, data_dir=data_dir, image_size=image_size,
                                    imbalance=imbalance, subset=subset, seed=seed, **load_options)
  test, test_truth = sources.load(dataset, split=test_split, data_dir=data_dir, image_size=image_size,
                                  subset=test_subset, seed=seed, **load_options)
  for name, truth in ((train_split, train_truth), (test_split, test_truth)):
    if truth is None:
      raise ValueError(f"dataset {dataset!r} split {name!r} has no class labels to evaluate against")
  if image_size is None:
    if train.streamed:
      raise ValueError(f"dataset {dataset!r} is streamed (images of varying size): give image_size")
    image_size = int(train.images.shape[1])
  return eval_callbacks.EvaluationData(train, train_truth, test, test_truth, image_size=image_size,
                                       batch_size=batch_size, seed=seed)


def build_callbacks(data: eval_callbacks.EvaluationData, options: EvaluationOptions = EvaluationOptions(),
                    *, every_epochs: Optional[int] = None, at_end: bool = True,
                    log_dir: Optional[str] = None, verbose: int = 0,
                    activations: Optional[keras.Model] = None) -> List[keras.callbacks.Callback]:
  """[KNNCallback, LinearProbeCallback, ClusterMetricsCallback] sharing one `ActivationCache`;
  `activations`: a functional model from images to named activations (default: the model's backbone)."""
  cache = eval_callbacks.ActivationCache(data, [], heads=True, activations=activations,
                                         verbose=verbose)
  common = dict(every_epochs=every_epochs, at_end=at_end, cache=cache, log_dir=log_dir, verbose=verbose)
  return [
      eval_callbacks.KNNCallback(data, layer=options.knn_layer, ks=options.knn_ks, activations=activations,
                                 **common),
      eval_callbacks.LinearProbeCallback(data, layers=options.probe_layers or None,
                                         mode=options.probe_mode, options=options.probe,
                                         activations=activations, **common),
      eval_callbacks.ClusterMetricsCallback(data, **common),
  ]


def collect_metrics(callbacks) -> Dict[str, object]:
  """The last metrics of the suite's callbacks, merged, with the seconds of the shared passes."""
  metrics = {}
  for callback in callbacks:
    metrics.update(callback.last_metrics)
  caches = {id(c.cache): c.cache for c in callbacks if c.cache is not None}
  metrics["evaluation_pass_seconds"] = sum(cache.pass_seconds for cache in caches.values())
  return metrics


def evaluate_model(model: keras.Model, data: eval_callbacks.EvaluationData,
                   options: EvaluationOptions = EvaluationOptions(), *, log_dir: Optional[str] = None,
                   verbose: int = 0, activations: Optional[keras.Model] = None) -> Dict[str, object]:
  """Runs the whole suite on `model` now; returns the merged metrics (with "evaluation_seconds")."""
  start = time.perf_counter()
  callbacks = build_callbacks(data, options, log_dir=log_dir, verbose=verbose, activations=activations)
  for callback in callbacks:
    callback.set_model(model)
  for callback in callbacks:
    callback.evaluate()
  metrics = collect_metrics(callbacks)
  metrics["evaluation_seconds"] = time.perf_counter() - start
  return metrics


def table(metrics: Dict[str, object]) -> str:
  """A readable text table of a suite's metrics (kNN, probes per layer, clusters per head)."""
  lines = []
  knn = sorted(((k, v) for k, v in metrics.items() if k.startswith("knn_top1/")),
               key=lambda item: (item[0].rsplit("/", 1)[0], int(item[0].rsplit("=", 1)[1])))
  if knn:
    lines.append("weighted kNN top-1 (test)")
    lines += [f"  {k[len('knn_top1/'):]:<24} {100 * v:6.2f}%" for k, v in knn]
  layers = [k[len("probe_test_top1/"):] for k in metrics if k.startswith("probe_test_top1/")]
  if layers:
    lines.append(f"linear probes          {'train':>8} {'test':>8}")
    for layer in layers:
      best = "  <- best" if layer == metrics.get("probe_best_layer") else ""
      lines.append(f"  {layer:<20} {100 * metrics[f'probe_train_top1/{layer}']:7.2f}% "
                   f"{100 * metrics[f'probe_test_top1/{layer}']:7.2f}%{best}")
  for source, title in (("cluster_selabel", "self-labels vs train classes"),
                        ("cluster_test", "head argmax vs test classes")):
    heads = sorted({k.split("/")[1] for k in metrics if k.startswith(source + "/")},
                   key=lambda h: int(h.split("_")[1]))
    if not heads:
      continue
    lines.append(f"{title:<26} {'NMI':>6} {'AMI':>6} {'ARI':>6} {'acc':>6} {'sizes':>14}")
    for head in heads:
      get = lambda name, head=head: metrics.get(f"{source}/{head}/{name}")  # pylint: disable=cell-var-from-loop
      accuracy = get("majority_accuracy") if get("majority_accuracy") is not None else get(
          "hungarian_accuracy")
      lines.append(f"  {head:<24} {get('nmi'):6.3f} {get('adjusted_nmi'):6.3f} {get('ari'):6.3f} "
                   f"{accuracy:6.3f} {int(get('size_min')):>6}..{int(get('size_max')):<7}")
  if any(k.startswith("cluster_") for k in metrics):
    lines.append("  (acc: Hungarian-matched where K <= classes, majority vote where K > classes)")
  seconds = [f"{k} {v:.1f}" for k, v in metrics.items() if k.endswith("_seconds")]
  if seconds:
    lines.append("seconds: " + ", ".join(seconds))
  return "\n".join(lines)
