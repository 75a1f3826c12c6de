"""Clustering heads: the heads spec ("3000x10") and `MultiHead`, T linear classifiers on the features.

The paper trains T heads at once (sec. 3.3, "multiple simultaneous clusterings"), head t a linear map
from the backbone's features to K_t cluster logits, each with its own pseudo-labels. The official code
names them top_layer0..top_layer{T-1}; here they are head_0..head_{T-1} inside one `MultiHead` layer.
"""

import numbers
import re
from typing import Sequence, Tuple, Union

import keras

_SPEC_HELP = ("use KxT (e.g. 3000x10: T heads of K clusters each) or a comma list of cluster counts "
              "(e.g. 128,256,512), all >= 1")
_WHOLE_NUMBER = re.compile(r"[0-9]+")


def parse_heads(spec: str) -> Tuple[int, ...]:
  """Parses a heads spec into the number of clusters of every head.

  Args:
    spec: "KxT" for T heads of K clusters each ("3000x10" -> (3000,) * 10), or a comma list with one
      cluster count per head ("128,256,512"; "128" is a single head). Whitespace around the numbers
      is ignored; 'X' works as 'x'.

  Returns:
    (K_0, ..., K_{T-1}), every count >= 1.

  Raises:
    ValueError: if `spec` has neither form or a count is 0; the message names the spec.
    TypeError: if `spec` is not a string.
  """
  if not isinstance(spec, str):
    raise TypeError(f"heads spec must be a string such as '3000x10' or '128,256,512', got {spec!r} "
                    f"of type {type(spec).__name__}")
  text = spec.strip().lower()
  if "x" in text:
    factors = text.split("x")
    if len(factors) != 2:
      raise _malformed(spec, "more than one 'x'")
    num_clusters = _count(spec, factors[0], "K, the clusters per head,")
    num_heads = _count(spec, factors[1], "T, the number of heads,")
    return (num_clusters,) * num_heads
  return tuple(_count(spec, entry, "a cluster count") for entry in text.split(","))


def _count(spec, text, what):
  text = text.strip()
  if not text:
    raise _malformed(spec, f"{what} is missing")
  if not _WHOLE_NUMBER.fullmatch(text):
    raise _malformed(spec, f"{what} is {text!r}, not a whole number")
  if int(text) < 1:
    raise _malformed(spec, f"{what} is {int(text)}")
  return int(text)


def _malformed(spec, reason):
  return ValueError(f"heads spec {spec!r} is malformed ({reason}): {_SPEC_HELP}")


@keras.saving.register_keras_serializable(package="selabel_tf")
class MultiHead(keras.layers.Layer):
  """T linear clustering heads on shared features.

  Head t is a `Dense(K_t)` named head_t. The layer computes in float32 whatever the global dtype policy
  (unless a `dtype` is passed): under "mixed_bfloat16" the features are cast up on the way in, so the
  logits, the cross-entropy's softmax over thousands of clusters and the log-probabilities handed to
  the labeller keep float32 precision, for the cost of T small matmuls.

  Weights start as the official AlexNet's top layers: N(0, 0.01^2) kernels, zero biases. Every head
  gets its own copy of `kernel_initializer` (an integer seed is offset by the head index), so heads
  with equal K do not start identical.

  Args:
    num_clusters: (K_0, ..., K_{T-1}), ints >= 1, or a spec string for `parse_heads` ("3000x10").
    kernel_initializer: initializer (or its name or config) of every head's kernel [D, K_t];
      default N(0, 0.01^2).
    bias_initializer: initializer of every head's bias [K_t].
    **kwargs: `keras.layers.Layer` arguments (name, dtype, trainable).

  Call args:
    features: float [B, D].

  Returns:
    A list of T float32 tensors [B, K_t], the logits of each head.

  Raises:
    ValueError: on a malformed spec or a cluster count that is not an int >= 1.
  """

  def __init__(self,
               num_clusters: Union[str, Sequence[int]],
               kernel_initializer=None,
               bias_initializer="zeros",
               **kwargs):
    kwargs.setdefault("dtype", "float32")
    super().__init__(**kwargs)
    if isinstance(num_clusters, str):
      num_clusters = parse_heads(num_clusters)
    counts = tuple(num_clusters) if isinstance(num_clusters, (tuple, list)) else ()
    if not counts or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1
                             for k in counts):
      raise ValueError(f"num_clusters must be a non-empty sequence of ints >= 1 (one per head) or a heads "
                       f"spec such as '3000x10', got {num_clusters!r}")
    self.num_clusters = tuple(int(k) for k in counts)
    if kernel_initializer is None:
      kernel_initializer = keras.initializers.RandomNormal(stddev=0.01)
    self.kernel_initializer = keras.initializers.get(kernel_initializer)
    self.bias_initializer = keras.initializers.get(bias_initializer)
    self.heads = [
        keras.layers.Dense(k, kernel_initializer=_copy(self.kernel_initializer, t),
                           bias_initializer=_copy(self.bias_initializer, t), dtype=self.dtype_policy,
                           name=f"head_{t}")
        for t, k in enumerate(self.num_clusters)
    ]

  @property
  def num_heads(self) -> int:
    return len(self.num_clusters)

  def build(self, input_shape):
    for head in self.heads:
      head.build(input_shape)

  def call(self, features):
    return [head(features) for head in self.heads]

  def compute_output_shape(self, input_shape):
    return [(*input_shape[:-1], k) for k in self.num_clusters]

  def get_config(self):
    config = super().get_config()
    config.update({
        "num_clusters": list(self.num_clusters),
        "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        "bias_initializer": keras.initializers.serialize(self.bias_initializer),
    })
    return config


def _copy(initializer, index):
  """A fresh instance of `initializer` for head `index`; an integer seed becomes seed + index.

  Keras initializers return the same values on every call (an unseeded one draws its seed once, at
  construction), so sharing one instance would make heads of equal size identical.
  """
  config = initializer.get_config()
  if isinstance(config.get("seed"), int):
    config["seed"] += index
  return initializer.__class__.from_config(config)
