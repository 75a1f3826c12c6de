"""Evaluation of features and clusters (paper sec. 4.1): weighted kNN, linear probes, cluster metrics."""
