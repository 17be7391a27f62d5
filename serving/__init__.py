"""fgr-serve: a TensorFlow Serving-compatible model server for any SavedModel."""
