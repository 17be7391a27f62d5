"""Per-dimension scaled int8 codes scored in TF, then an exact float rerank of the top candidates."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from engine import base, search_ops


def quantize(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns (int8 codes [N, d], float32 scales [d]) with embeddings ≈ codes * scales."""
  scales = np.abs(embeddings).max(axis=0) / 127.0
  scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
  codes = np.clip(np.rint(embeddings / scales), -127, 127).astype(np.int8)
  return codes, scales


def _score_bfloat16(queries: tf.Tensor, codes: tf.Tensor, scales: tf.Tensor) -> tf.Tensor:
  """Codes cast to bfloat16 (exact for int8) and one bf16 matmul: fast only on oneDNN (AMX/AVX512-BF16)."""
  scaled = tf.cast(queries * scales, tf.bfloat16)
  return tf.cast(tf.matmul(scaled, tf.cast(codes, tf.bfloat16), transpose_b=True), tf.float32)


def _score_float32(queries: tf.Tensor, codes: tf.Tensor, scales: tf.Tensor) -> tf.Tensor:
  """Codes cast to float32 in the matmul: XLA fuses the cast into the dot, so no [N, d] copy is made."""
  return tf.matmul(queries * scales, tf.cast(codes, tf.float32), transpose_b=True)


_score_xla = tf.function(_score_float32, jit_compile=True, reduce_retracing=True)


class Int8Index(base.Index):
  """Scalar-quantised catalog: int8 codes with one scale per dimension, reranked exactly.

  Approximate scores come from the int8 codes (a quarter of float32's bytes). TF has no fast int8
  GEMV on CPU (an int8 -> int32 dot under XLA, TF's int8 `MatMul` and `QuantizedMatMul` all lost to
  float32 over 4x the bytes: docs/history/benchmarks-2026-11.md, Index backends), so by default XLA
  scores them: it fuses the cast to float32 into the dot and streams the int8 codes once, which
  makes a single query faster than exact float32 search on either of TensorFlow's CPU kernel
  libraries (docs/performance.md, index backends). Without XLA (`jit_compile=False`, for stock TF
  Serving without --xla_cpu_compilation_enabled) the codes are cast to bfloat16 (exact for int8) for
  one bf16 matmul, which only oneDNN's kernels run fast, and fgr-serve runs Eigen's. Ineligible
  items are masked before the candidate top-k, so the `rerank_candidates` survivors are all eligible
  and k results come back whenever k eligible items exist. Those candidates are rescored exactly
  against float32 vectors, kept for that purpose and counted in `nbytes()` (see `memory_breakdown()`
  for codes vs rerank bytes).

  Args:
    embeddings: float32 [N, d] item embeddings.
    eligible: optional bool [N] mask.
    rerank_candidates: candidates rescored exactly per query (default 4k, set at build).
    jit_compile: score the codes under XLA (see above). XLA compiles once per batch size (tens of
      milliseconds at 100k items, on that size's first call); stock TF Serving needs
      --xla_cpu_compilation_enabled=true to load the version.
  """

  def __init__(
    self,
    embeddings: np.ndarray,
    eligible: np.ndarray | None = None,
    rerank_candidates: int = 400,
    jit_compile: bool = True,
    name: str = "int8",
  ):
    super().__init__(embeddings.shape[0], eligible, name=name)
    codes, scales = quantize(embeddings)
    self.codes = tf.Variable(codes, trainable=False, name="codes")
    self.scales = tf.Variable(scales, trainable=False, name="scales")
    self.vectors = tf.Variable(embeddings, trainable=False, name="rerank_vectors")
    self.rerank_candidates = int(min(rerank_candidates, self.num_items))
    self._jit_compile = jit_compile

  def approximate_scores(self, queries: tf.Tensor) -> tf.Tensor:
    """Scores [B, N] from the int8 codes, ineligible items at -inf."""
    score = _score_xla if self._jit_compile else _score_bfloat16
    # The variables' values go in, not the variables: read inside the XLA cluster, a variable would be
    # copied into it on each call.
    scores = score(tf.cast(queries, tf.float32), tf.convert_to_tensor(self.codes), tf.convert_to_tensor(self.scales))
    return base.mask_ineligible(scores, self.eligible)

  def search(self, queries: tf.Tensor, k: int, rerank_candidates: tf.Tensor | None = None) -> base.SearchResult:
    """Top-k by int8 scores, then exact rerank; `rerank_candidates` 0 (or omitted) uses the built default."""
    k = min(k, self.num_items)
    count = search_ops.rerank_candidates_option(rerank_candidates, self.rerank_candidates)
    count = tf.clip_by_value(count, k, self.num_items)
    _, rows = tf.math.top_k(self.approximate_scores(queries), k=count)
    return search_ops.rerank(queries, rows, self.vectors, self.eligible, k)

  def search_option_specs(self) -> dict[str, tf.TensorSpec]:
    return {"rerank_candidates": tf.TensorSpec([], tf.int32, name="rerank_candidates")}

  def memory_breakdown(self) -> dict[str, int]:
    """Bytes of the int8 codes (+ scales) and of the float32 vectors kept for the exact rerank."""
    return {
      "codes": int(self.codes.numpy().nbytes + self.scales.numpy().nbytes),
      "rerank": int(self.vectors.numpy().nbytes),
    }

  def nbytes(self) -> int:
    return sum(self.memory_breakdown().values())


def check_options(
  num_items: int,
  k: int,
  *,
  rerank_candidates: int | None,
  target_recall: float,
  seed: int = 0,
  **unchecked: object,
) -> None:
  """Raises ValueError naming the first option `build_int8` refuses (also fgr-export's, before it embeds)."""
  del num_items, k, unchecked
  base.check_option("seed", seed, 0)
  base.check_option("rerank_candidates", rerank_candidates or 0, 0, valid="0 (tuned for target_recall) or positive")
  base.check_option("target_recall", target_recall, 0, 1, integer=False)


def build_int8(
  embeddings: np.ndarray,
  *,
  k: int,
  eligible: np.ndarray | None = None,
  rerank_candidates: int | None = None,
  target_recall: float = 0.99,
  tuning_queries: np.ndarray | None = None,
  seed: int = 0,
  jit_compile: bool = True,
) -> Int8Index:
  """Builds the int8 index; rerank_candidates is tuned for `target_recall` (k to 16k) unless given.

  Args:
    embeddings: float32 [N, d].
    k: the default number of neighbours.
    eligible: optional bool [N] mask.
    rerank_candidates: candidates rescored exactly per query; tuned when omitted or 0.
    target_recall: recall@k the tuned candidates reach on the tuning queries (plus 0.01 margin).
    tuning_queries: float32 [Q, d]; catalog rows stand in when omitted.
    seed: seed for picking stand-in tuning queries.
    jit_compile: score the codes under XLA (`Int8Index`).
  """
  check_options(embeddings.shape[0], k, rerank_candidates=rerank_candidates, target_recall=target_recall)
  index = Int8Index(embeddings, eligible, rerank_candidates=rerank_candidates or k, jit_compile=jit_compile)
  if not rerank_candidates:
    queries = search_ops.tuning_queries_or_sample(embeddings, tuning_queries, seed=seed)
    ladder = [min(m * k, embeddings.shape[0]) for m in (1, 2, 4, 8, 16)]
    index.rerank_candidates, _ = search_ops.tune_search_option(
      index, "rerank_candidates", ladder, embeddings, queries, k, target_recall
    )
  return index


BACKEND = base.Backend("int8", build_int8, check_options)
