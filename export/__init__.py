"""Export of full-graph SavedModels: versioned, atomic, with index refresh."""

import os

# TFRS and our towers need Keras 2 (tf-keras); this must happen before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
