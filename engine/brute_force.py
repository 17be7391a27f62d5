"""Exact maximum-inner-product search: one matmul and a top-k, the reference for every backend."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from engine import base


class BruteForceIndex(base.Index):
  """Scores every catalog item and keeps the best k.

  Args:
    embeddings: float32 [N, d] item embeddings.
    eligible: optional bool [N] mask.
    dtype: storage and matmul dtype, `float32` or `bfloat16` (half the bytes, scores cast back).
  """

  def __init__(self, embeddings: np.ndarray, eligible: np.ndarray | None = None,
               dtype: str = "float32", name: str = "brute_force"):
    super().__init__(embeddings.shape[0], eligible, name=name)
    self._dtype = tf.as_dtype(dtype)
    if self._dtype not in (tf.float32, tf.bfloat16):
      raise ValueError(f"brute_force dtype must be float32 or bfloat16, got {dtype}")
    self.embeddings = tf.Variable(tf.cast(embeddings, self._dtype), trainable=False, name="embeddings")

  def search(self, queries: tf.Tensor, k: int, **options: tf.Tensor) -> base.SearchResult:
    del options  # Exact search has no knobs.
    scores = tf.matmul(tf.cast(queries, self._dtype), self.embeddings, transpose_b=True)
    scores = base.mask_ineligible(tf.cast(scores, tf.float32), self.eligible)
    k = min(k, self.num_items)
    top_scores, top_rows = tf.math.top_k(scores, k=k)
    return base.finalize(top_scores, top_rows)

  def nbytes(self) -> int:
    return int(np.prod(self.embeddings.shape)) * self._dtype.size


def build_brute_force(embeddings: np.ndarray, *, k: int, eligible: np.ndarray | None = None,
                      dtype: str = "float32") -> BruteForceIndex:
  del k  # Exact search serves any k.
  return BruteForceIndex(embeddings, eligible, dtype=dtype)
