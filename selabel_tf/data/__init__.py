"""Data sources and input pipelines: indexed image datasets, augmentation, tf.data pipelines."""
