"""Learned 128-bit binary codes scored with XOR + popcount in TF ops, then an exact float rerank."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from engine import base, hashing, search_ops


def similarity_dtype(bits: int) -> tf.DType:
  """The narrowest integer type holding `bits` + 1: uint8 keeps the scan byte-wide up to 192 bits."""
  return next(dtype for dtype in (tf.uint8, tf.uint16, tf.int32) if dtype.max > bits)


def _hamming_similarity(query_code: tf.Tensor, code_words: tf.Tensor, eligible: tf.Tensor, bits: int) -> tf.Tensor:
  """bits + 1 - Hamming distance [N] of one query code [W] to every item; 0 for ineligible items.

  Summed in `similarity_dtype(bits)`: in a narrower type the distance and bits + 1 wrap (at 256 bits an
  exact match would score 1, the lowest similarity).
  """
  dtype = similarity_dtype(bits)
  distance = None
  for w in range(code_words.shape[0]):  # A static handful of 64-bit words.
    count = tf.raw_ops.PopulationCount(x=tf.bitwise.bitwise_xor(code_words[w], query_code[w]))  # uint8 [N], ≤ 64
    count = tf.cast(count, dtype)
    distance = count if distance is None else distance + count
  similarity = tf.cast(bits + 1, dtype) - distance
  return tf.where(eligible, similarity, tf.zeros_like(similarity))


_hamming_similarity_xla = tf.function(_hamming_similarity, jit_compile=True, reduce_retracing=True)


class BinaryIndex(base.Index):
  """Items as `bits`-bit codes from a hashing layer; candidates by Hamming distance, exact rerank.

  The query is hashed by the same layer inside the graph, each 64-bit word of its code is XORed with
  the catalog's words and `PopulationCount` gives the Hamming distance, one byte per item up to 192
  bits (two bytes beyond, `similarity_dtype`). The `rerank_candidates` closest eligible items are then rescored exactly against float32 vectors kept
  for that purpose and counted in `nbytes()` (`memory_breakdown()` separates them from the codes).
  Ineligible items get similarity 0 before the candidate top-k, so they only surface when fewer
  than `rerank_candidates` eligible items exist, and the rerank drops them.

  Args:
    embeddings: float32 [N, d] item embeddings.
    hasher: the hashing layer (learned, or random hyperplanes as a baseline).
    eligible: optional bool [N] mask.
    rerank_candidates: candidates rescored exactly per query.
    jit_compile: fuse XOR + popcount + sum with XLA: 1.5x faster per query at 1M items, within
      10% at 100k (docs/performance.md), but stock TF Serving then needs
      --xla_cpu_compilation_enabled=true to load the version, so it is opt-in.
  """

  def __init__(
    self,
    embeddings: np.ndarray,
    hasher: hashing.SignHash,
    eligible: np.ndarray | None = None,
    rerank_candidates: int = 2000,
    jit_compile: bool = False,
    name: str = "binary",
  ):
    super().__init__(embeddings.shape[0], eligible, name=name)
    self.hasher = hasher
    # Word-major [W, N] so each XOR streams one contiguous int64 column.
    self.codes = tf.Variable(np.ascontiguousarray(hasher.pack_numpy(embeddings).T), trainable=False, name="codes")
    self.vectors = tf.Variable(embeddings, trainable=False, name="rerank_vectors")
    self.rerank_candidates = int(min(rerank_candidates, self.num_items))
    self._jit_compile = jit_compile

  def search(self, queries: tf.Tensor, k: int, rerank_candidates: tf.Tensor | None = None) -> base.SearchResult:
    """Hamming top candidates, then exact rerank; `rerank_candidates` 0 (or omitted) uses the built default."""
    k = min(k, self.num_items)
    queries = tf.cast(queries, tf.float32)
    count = search_ops.rerank_candidates_option(rerank_candidates, self.rerank_candidates)
    count = tf.clip_by_value(count, k, self.num_items)
    query_codes = self.hasher.pack(queries)  # [B, W]
    similarity = _hamming_similarity_xla if self._jit_compile else _hamming_similarity

    def candidates(query_code: tf.Tensor) -> tf.Tensor:
      # One query at a time: a [B, N] distance matrix would not fit for large batches.
      return tf.math.top_k(similarity(query_code, self.codes, self.eligible, self.hasher.bits), k=count)[1]

    rows = tf.cond(  # map_fn cannot stack an empty batch of unknown-width rows.
      tf.shape(query_codes)[0] > 0,
      lambda: tf.map_fn(
        candidates, query_codes, fn_output_signature=tf.TensorSpec([None], tf.int32), parallel_iterations=2
      ),
      lambda: tf.zeros([0, count], tf.int32),
    )
    return search_ops.rerank(queries, rows, self.vectors, self.eligible, k)

  def search_option_specs(self) -> dict[str, tf.TensorSpec]:
    return {"rerank_candidates": tf.TensorSpec([], tf.int32, name="rerank_candidates")}

  def memory_breakdown(self) -> dict[str, int]:
    """Bytes of the codes (+ hashing layer) and of the float32 vectors kept for the exact rerank."""
    layer = self.hasher.projection.numpy().nbytes + self.hasher.bias.numpy().nbytes
    return {"codes": int(self.codes.numpy().nbytes), "hasher": int(layer), "rerank": int(self.vectors.numpy().nbytes)}

  def nbytes(self) -> int:
    return sum(self.memory_breakdown().values())


def check_options(
  num_items: int,
  k: int,
  *,
  bits: int,
  rerank_candidates: int | None,
  target_recall: float,
  train_steps: int,
  seed: int = 0,
  **unchecked: object,
) -> None:
  """Raises ValueError naming the first option `build_binary` refuses (also fgr-export's, before it embeds)."""
  del num_items, k, unchecked
  hashing.check_bits(bits)
  base.check_option("seed", seed, 0)
  base.check_option("rerank_candidates", rerank_candidates or 0, 0, valid="0 (tuned for target_recall) or positive")
  base.check_option("target_recall", target_recall, 0, 1, integer=False)
  base.check_option("train_steps", train_steps, 0)


def build_binary(
  embeddings: np.ndarray,
  *,
  k: int,
  eligible: np.ndarray | None = None,
  bits: int = 128,
  learned: bool = True,
  rerank_candidates: int | None = None,
  target_recall: float = 0.95,
  tuning_queries: np.ndarray | None = None,
  jit_compile: bool = False,
  train_steps: int = 600,
  seed: int = 0,
) -> BinaryIndex:
  """Builds the binary index; `learned=False` uses random hyperplanes (the baseline).

  Args:
    embeddings: float32 [N, d].
    k: the default number of neighbours.
    eligible: optional bool [N] mask.
    bits: code length, a positive multiple of 64.
    learned: train the hashing layer (`hashing.train_sign_hash`) instead of random hyperplanes.
    rerank_candidates: candidates rescored exactly per query; tuned for `target_recall` (10k to
      320k) when omitted or 0.
    target_recall: recall@k the tuned candidates reach on the tuning queries (plus 0.01 margin).
    tuning_queries: float32 [Q, d]; catalog rows stand in when omitted.
    jit_compile: fuse the Hamming scan with XLA (see `BinaryIndex`).
    train_steps: optimiser steps of the hashing layer.
    seed: random seed.
  """
  # Refused before hashing trains, naming the option.
  check_options(
    embeddings.shape[0],
    k,
    bits=bits,
    rerank_candidates=rerank_candidates,
    target_recall=target_recall,
    train_steps=train_steps,
  )
  if learned:
    hasher = hashing.train_sign_hash(embeddings, bits=bits, steps=train_steps, seed=seed)
  else:
    hasher = hashing.random_sign_hash(embeddings, bits=bits, seed=seed)
  index = BinaryIndex(
    embeddings, hasher, eligible, rerank_candidates=rerank_candidates or 10 * k, jit_compile=jit_compile
  )
  if not rerank_candidates:
    queries = search_ops.tuning_queries_or_sample(embeddings, tuning_queries, seed=seed)
    ladder = [min(m * k, embeddings.shape[0]) for m in (10, 20, 40, 80, 160, 320)]
    index.rerank_candidates, _ = search_ops.tune_search_option(
      index, "rerank_candidates", ladder, embeddings, queries, k, target_recall
    )
  return index


BACKEND = base.Backend("binary", build_binary, check_options)
