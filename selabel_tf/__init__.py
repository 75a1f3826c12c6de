"""selabel_tf: SeLa self-labelling (Asano, Rupprecht, Vedaldi, ICLR 2020) in TensorFlow/Keras 3."""

from selabel_tf.labeller import DEFAULT_MAX_ITERS
from selabel_tf.labeller import DEFAULT_TOL
from selabel_tf.labeller import LabelAssignment
from selabel_tf.labeller import assign_labels
from selabel_tf.labeller import assign_labels_sharded

__version__ = "0.1.0"
