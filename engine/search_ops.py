"""In-graph building blocks shared by the index backends: exact scoring, candidate top-k, fallback."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from engine import base


def checked_option(
  value: tf.Tensor | int | None, default: int, name: str, low: int, high: tf.Tensor | int | None, valid: str
) -> tf.Tensor:
  """A per-request int32 knob: omitted or 0 takes `default`, other values must lie in [low, high].

  A value out of range fails the request with InvalidArgument (a server's INVALID_ARGUMENT) whose message
  names the knob, says what is `valid` and gives the value, rather than being silently clamped or
  replaced. `high` may be a tensor (e.g. the catalog size, which a refresh can change under one graph),
  or None for no upper bound (a backend that caps the value itself).
  """
  if value is None:
    return tf.constant(default, tf.int32)
  value = tf.cast(tf.reshape(value, []), tf.int32)
  in_range = value >= low if high is None else tf.logical_and(value >= low, value <= tf.cast(high, tf.int32))
  check = tf.debugging.Assert(
    tf.logical_or(tf.equal(value, 0), in_range), [f"{name} must be {valid}; got", value], name=f"check_{name}"
  )
  with tf.control_dependencies([check]):
    return tf.where(value > 0, value, tf.constant(default, tf.int32))


def rerank_candidates_option(value: tf.Tensor | None, default: int) -> tf.Tensor:
  """The per-request `rerank_candidates` of an index that reranks `default` by default (int8, binary).

  Negative values are INVALID_ARGUMENT; positive ones are kept between k and the catalog size by the caller.
  """
  return checked_option(
    value,
    default,
    "rerank_candidates",
    1,
    None,
    f"0 (the built default, {default}) or positive (kept between k and the number of ads)",
  )


def exact_search(queries: tf.Tensor, vectors: tf.Tensor, eligible: tf.Tensor, k: int) -> base.SearchResult:
  """Scores every row of `vectors` [N, d] and keeps the k best eligible ones per query."""
  scores = tf.matmul(tf.cast(queries, vectors.dtype), vectors, transpose_b=True)
  scores = base.mask_ineligible(tf.cast(scores, tf.float32), eligible)
  top_scores, top_rows = tf.math.top_k(scores, k=k)
  return base.finalize(top_scores, top_rows)


def top_k_of_candidates(scores: tf.Tensor, rows: tf.Tensor, eligible: tf.Tensor, k: int) -> base.SearchResult:
  """Keeps the k best eligible candidates of each query.

  Args:
    scores: float [B, C] candidate scores; NaN or -inf marks an empty slot.
    rows: int [B, C] catalog rows of the candidates (-1 means no item).
    eligible: bool [num_items] mask.
    k: number of results; rows with fewer than k valid candidates are padded with -inf / -1.
  """
  scores = tf.cast(scores, tf.float32)
  rows = tf.cast(rows, tf.int32)
  scores = tf.where(tf.math.is_nan(scores), tf.constant(-np.inf, tf.float32), scores)
  scores = base.mask_ineligible(scores, eligible, rows)
  # Pad to at least k columns so top_k is defined even when a backend returned fewer candidates.
  pad = tf.maximum(k - tf.shape(scores)[1], 0)
  scores = tf.pad(scores, [[0, 0], [0, pad]], constant_values=-np.inf)
  rows = tf.pad(rows, [[0, 0], [0, pad]], constant_values=-1)
  top_scores, positions = tf.math.top_k(scores, k=k)
  return base.finalize(top_scores, tf.gather(rows, positions, batch_dims=1))


def rerank(queries: tf.Tensor, rows: tf.Tensor, vectors: tf.Tensor, eligible: tf.Tensor, k: int) -> base.SearchResult:
  """Rescores candidate `rows` [B, C] exactly against float `vectors` [N, d] and keeps the best k."""
  rows = tf.cast(rows, tf.int32)
  candidates = tf.gather(vectors, tf.maximum(rows, 0))  # [B, C, d]
  scores = tf.einsum("bd,bcd->bc", tf.cast(queries, candidates.dtype), candidates)
  scores = tf.where(rows >= 0, tf.cast(scores, tf.float32), tf.constant(-np.inf, tf.float32))
  return top_k_of_candidates(scores, rows, eligible, k)


def fill_short_rows(result: base.SearchResult, k: int, exact: Callable[[], base.SearchResult]) -> base.SearchResult:
  """Replaces rows that came back with fewer than k items by an exact masked search.

  Approximate backends over-fetch and then drop ineligible items; when that leaves a query short,
  `exact` (a masked search over the whole catalog) answers it instead, so a request gets k results
  whenever k eligible items exist. The branch is a `tf.cond`, so the exact scan only runs when needed.
  """
  short = result.indices[:, -1] < 0  # [B]: results are sorted, so a short row ends with -1.

  def patched() -> tuple[tf.Tensor, tf.Tensor]:
    fallback = exact()
    return (
      tf.where(short[:, tf.newaxis], fallback.scores, result.scores),
      tf.where(short[:, tf.newaxis], fallback.indices, result.indices),
    )

  scores, indices = tf.cond(tf.reduce_any(short), patched, lambda: (result.scores, result.indices))
  scores = tf.ensure_shape(scores, [None, k])
  indices = tf.ensure_shape(indices, [None, k])
  return base.SearchResult(scores=scores, indices=indices)


def exact_top_k_numpy(
  queries: np.ndarray, items: np.ndarray, k: int, eligible: np.ndarray | None = None, chunk: int = 256
) -> np.ndarray:
  """Exact top-k rows [Q, k] by dot product, best first, in NumPy (the reference for recall).

  With `eligible`, only eligible rows are answers: past the number of eligible items, a row is -1.
  """
  out = np.empty([queries.shape[0], k], dtype=np.int64)
  for start in range(0, queries.shape[0], chunk):
    scores = queries[start : start + chunk] @ items.T
    if eligible is not None:
      scores[:, ~eligible] = -np.inf
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
  if eligible is not None and k > int(np.count_nonzero(eligible)):
    out[~np.asarray(eligible, bool)[out]] = -1
  return out


def exact_top_k_tf(queries: np.ndarray, items: np.ndarray, k: int, chunk: int = 64) -> np.ndarray:
  """Exact top-k rows [Q, k] with TF's multi-threaded matmul and top_k (build-time tuning's reference).

  Same answer as `exact_top_k_numpy` up to ties, and faster on large catalogs, where NumPy's
  single-threaded argpartition dominates.
  """
  items = tf.convert_to_tensor(items, tf.float32)
  return np.concatenate(
    [
      tf.math.top_k(
        tf.matmul(tf.constant(queries[start : start + chunk], tf.float32), items, transpose_b=True), k=k
      ).indices.numpy()
      for start in range(0, queries.shape[0], chunk)
    ]
  ).astype(np.int64)


def tuning_queries_or_sample(
  embeddings: np.ndarray, tuning_queries: np.ndarray | None, count: int = 200, seed: int = 0
) -> np.ndarray:
  """The given tuning queries, or `count` random catalog rows standing in for them."""
  if tuning_queries is not None:
    return np.asarray(tuning_queries, np.float32)
  rows = np.random.default_rng(seed).choice(embeddings.shape[0], min(count, embeddings.shape[0]), replace=False)
  return embeddings[rows]


def tune_search_option(
  index: base.Index,
  option: str,
  ladder: list[int],
  embeddings: np.ndarray,
  tuning_queries: np.ndarray,
  k: int,
  target_recall: float,
  batch_size: int = 64,
) -> tuple[int, float]:
  """Smallest value of a per-request `option` whose recall@k on the tuning queries reaches the target.

  Backends call this at build time to set their default knob (probes, rerank candidates) from the
  data, as ScaNN's rules of thumb suggest, with a 0.01 margin for unseen queries. Returns
  (value, recall); the last ladder value when none reaches the target.
  """
  truth = exact_top_k_tf(tuning_queries, embeddings, k)
  search = tf.function(lambda q, v: index.search(q, k, **{option: v}).indices)
  target = min(1.0, target_recall + 0.01)
  recall = 0.0
  for value in ladder:
    found = np.concatenate(
      [
        search(tf.constant(tuning_queries[i : i + batch_size]), tf.constant(value, tf.int32)).numpy()
        for i in range(0, tuning_queries.shape[0], batch_size)
      ]
    )
    recall = recall_at_k(found, truth)
    if recall >= target:
      return value, recall
  return ladder[-1], recall


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean fraction of the true top-k rows found, per query; -1 in `truth` is no answer (fewer
  eligible items than k), so a query is judged on the answers it has."""
  hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth)]
  answers = np.count_nonzero(truth >= 0, axis=1)
  return float(np.mean([h / a if a else 1.0 for h, a in zip(hits, answers)]))
