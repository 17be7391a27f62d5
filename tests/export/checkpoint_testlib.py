"""Comparing two versions' variables checkpoints, for tests of publishes that rewrite one."""

import numpy as np
import tensorflow as tf

from export import version_files


def differing_tensors(version_a: str, version_b: str) -> list[str]:
  """Keys of the tensors whose values differ between two versions' checkpoints (which must hold the
  same keys with the same shapes), compared byte for byte: a float that is NaN, or memory a library
  left uninitialised, is "the same" when it was copied, as it would not be under `==`."""
  a, b = (tf.train.load_checkpoint(version_files.variables_prefix(v)) for v in (version_a, version_b))
  shapes = a.get_variable_to_shape_map()
  assert shapes == b.get_variable_to_shape_map()
  return sorted(key for key in shapes if not _same(a.get_tensor(key), b.get_tensor(key)))


def _same(x, y) -> bool:
  x, y = np.asarray(x), np.asarray(y)  # A scalar string comes back as bytes.
  if x.dtype.kind in "OS" or y.dtype.kind in "OS":  # Strings: values, not their pointers.
    return np.array_equal(x, y)
  return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
