"""Exact maximum-inner-product search: one matmul and a top-k, the reference for every backend."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from engine import base, search_ops


class BruteForceIndex(base.Index):
  """Scores every catalog item and keeps the best k.

  Args:
    embeddings: float32 [N, d] item embeddings.
    eligible: optional bool [N] mask.
    dtype: storage and matmul dtype, `float32` or `bfloat16` (half the bytes, scores cast back).
    jit_compile: compile the scoring with XLA. It fuses matmul, mask and top-k, which is faster for
      single queries (docs/history/benchmarks-2026-11.md, Index backends), but stock TF Serving only runs XLA functions
      with `--xla_cpu_compilation_enabled`, so it is off by default.
  """

  def __init__(
    self,
    embeddings: np.ndarray,
    eligible: np.ndarray | None = None,
    dtype: str = "float32",
    jit_compile: bool = False,
    name: str = "brute_force",
  ):
    super().__init__(embeddings.shape[0], eligible, name=name)
    self._dtype = tf.as_dtype(dtype)
    if self._dtype not in (tf.float32, tf.bfloat16):
      raise ValueError(f"brute_force dtype must be float32 or bfloat16, got {dtype}")
    self.embeddings = tf.Variable(tf.cast(embeddings, self._dtype), trainable=False, name="embeddings")
    self._jit_compile = jit_compile
    self._compiled = tf.function(search_ops.exact_search, jit_compile=True, reduce_retracing=True)

  def search(self, queries: tf.Tensor, k: int, **options: tf.Tensor) -> base.SearchResult:
    del options  # Exact search has no knobs.
    k = min(k, self.num_items)
    search = self._compiled if self._jit_compile else search_ops.exact_search
    return base.SearchResult(*search(queries, self.embeddings, self.eligible, k))

  def nbytes(self) -> int:
    return int(np.prod(self.embeddings.shape)) * self._dtype.size


def build_brute_force(
  embeddings: np.ndarray,
  *,
  k: int,
  eligible: np.ndarray | None = None,
  tuning_queries: np.ndarray | None = None,
  dtype: str = "float32",
  jit_compile: bool = False,
) -> BruteForceIndex:
  """Builds the exact index; `k` and `tuning_queries` are unused (exact search has nothing to tune)."""
  del k
  return BruteForceIndex(embeddings, eligible, dtype=dtype, jit_compile=jit_compile)


BACKEND = base.Backend("brute_force", build_brute_force)
