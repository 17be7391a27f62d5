"""Nearest-neighbour index backends and the full-graph module that joins towers and index."""

import os

# TFRS and our towers need Keras 2 (tf-keras); this must happen before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
