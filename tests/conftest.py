"""Test session setup: quiet TensorFlow and two logical CPU devices for the sharded labeller tests.

Both must happen before TensorFlow runs its first op (the device layout is fixed once the runtime
initialises), so they are module-level statements here: pytest imports conftest.py before any test
module.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
