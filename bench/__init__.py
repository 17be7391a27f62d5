"""Benchmarks: recall, QPS, latency, build time and bytes of the in-graph index backends."""

import os

# Same as engine/: TFRS and the towers need Keras 2; set before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
