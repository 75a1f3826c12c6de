"""Networks: the backbones (AlexNet, ResNet-18/50) with their probe activations, and the heads."""

from selabel_tf.modeling.backbones import BACKBONES
from selabel_tf.modeling.backbones import PROBE_LAYERS
from selabel_tf.modeling.backbones import build_backbone
from selabel_tf.modeling.backbones import embedding_layer
from selabel_tf.modeling.backbones import probe_layer_names
from selabel_tf.modeling.heads import MultiHead
from selabel_tf.modeling.heads import parse_heads
