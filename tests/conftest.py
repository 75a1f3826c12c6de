"""Test session setup: quiet TensorFlow and two logical CPU devices for the sharded labeller tests.

Both must happen before TensorFlow runs its first op (the device layout is fixed once the runtime
initialises), so they are module-level statements here: pytest imports conftest.py before any test
module.
"""

import contextlib
import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def make_npz(tmp_path_factory):
  """make_npz(num_examples, size, num_classes) -> path of a random uint8 .npz dataset with labels."""

  def make(num_examples, size, num_classes):
    path = tmp_path_factory.mktemp("data") / f"random_{num_examples}_{size}.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, size=(num_examples, size, size), dtype=np.uint8),
             labels=rng.integers(0, num_classes, size=num_examples))
    return str(path)

  return make


@pytest.fixture(scope="session")
def mirrored_strategy():
  """The one MirroredStrategy over the 2 logical CPUs that every test shares.

  Each strategy numbers its collective ops from the same start, and the collectives of one process share
  an executor: two strategies in one process can collide ("Shape mismatch in the collective instance"),
  which aborts every later collective. One strategy per test session avoids that.
  """
  return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def mixed_bfloat16():
  """Runs a test under the "mixed_bfloat16" dtype policy, restoring the previous policy after it."""
  import keras  # pylint: disable=g-import-not-at-top
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("mixed_bfloat16")
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def benchmark_module(name: str):
  """benchmarks/<name>.py as a module; the absl flags it defines are removed afterwards (absl's FLAGS is
  process-wide)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  before = set(flags.FLAGS)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(name, os.path.join(root, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)


@pytest.fixture
def load_benchmark():
  """load_benchmark(name) -> benchmarks/<name>.py as a module, its flags removed after the test."""
  with contextlib.ExitStack() as stack:
    yield lambda name: stack.enter_context(benchmark_module(name))
