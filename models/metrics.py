"""Offline retrieval metrics in NumPy: Recall/HitRate@K, NDCG@K, Xiaohongshu's "water-level" metrics,
the bid value recalled and the diversity of the recalled lists.

Every evaluation example is one query with one relevant item (the clicked ad), so Recall@K and
HitRate@K coincide per example; both names are reported because papers use either. Ranks are
0-based positions of the relevant item in the full-catalog ranking.

Recalled lists are int [n, K] catalog rows, best first. A row of -1 is padding (a list shorter than
K, as a served index returns when fewer items are eligible): it is never a hit, a category or a
point in a distance.
"""

from __future__ import annotations

import numpy as np


def ranking_metrics(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
  """Recall@K, HitRate@K and NDCG@K of single-relevant-item queries.

  Args:
    ranks: int [n] 0-based rank of each query's relevant item among all items.
    ks: cut-offs.

  Returns:
    {"recall@K", "hit_rate@K", "ndcg@K"} for each K; NDCG@K is 1 / log2(rank + 2) inside the top K
    (the ideal DCG of one relevant item is 1).
  """
  ranks = np.asarray(ranks)
  if ranks.size == 0:
    raise ValueError("No ranks to average")
  out: dict[str, float] = {}
  for k in ks:
    hit = ranks < k
    out[f"recall@{k}"] = out[f"hit_rate@{k}"] = float(hit.mean())
    out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
  return out


def _found(recalled: np.ndarray, positives: np.ndarray) -> np.ndarray:
  """bool [n]: each query's positive is in its recalled list (padding, -1, never matches a row)."""
  positives = np.asarray(positives)
  return np.any((np.asarray(recalled) == positives[:, np.newaxis]) & (positives[:, np.newaxis] >= 0), axis=1)


def coverage(recalled: np.ndarray, positives: np.ndarray, where: np.ndarray | None = None) -> float:
  """Share of positives found in their query's recalled set, over the examples `where` selects.

  Args:
    recalled: int [n, K] item rows recalled for each query.
    positives: int [n] the clicked (or converted) item row of each query.
    where: optional bool [n] examples to count (e.g. the converted clicks); NaN when none is selected.
  """
  found = _found(recalled, positives)
  if where is not None:
    found = found[np.asarray(where, dtype=bool)]
  return float(found.mean()) if found.size else float("nan")


def noise_ratio(recalled: np.ndarray, query_categories: np.ndarray, item_categories: np.ndarray) -> float:
  """Share of recalled items whose category differs from the query's category.

  Args:
    recalled: int [n, K] item rows recalled for each query; -1 padding is not counted.
    query_categories: [n] the category each query is about (logged with the example, or the clicked
      ad's category).
    item_categories: [N] category of every catalog row.

  Returns:
    Off-category recalled items over all recalled items; NaN when every entry is padding.
  """
  recalled = np.asarray(recalled)
  valid = recalled >= 0
  if not valid.any():
    return float("nan")
  off = np.asarray(item_categories)[np.where(valid, recalled, 0)] != np.asarray(query_categories)[:, np.newaxis]
  return float(np.sum(off & valid) / np.sum(valid))


def revenue_proxy(recalled: np.ndarray, positives: np.ndarray, bids: np.ndarray) -> dict[str, float]:
  """Bid value of the clicked ads that retrieval recalls: what a recall miss costs in money.

  A click on an ad pays about its bid, so the bids of recalled clicks are a proxy of the revenue
  the retrieval stage leaves reachable for ranking; unlike click coverage, it weighs each miss by
  what the ad would have paid.

  Args:
    recalled: int [n, K] item rows recalled for each query; -1 is padding.
    positives: int [n] the clicked item row of each query.
    bids: float [n] the clicked ad's bid of each query (the "bid" field of example batches).

  Returns:
    "revenue_per_query": sum of the recalled clicks' bids over n (the clicks' mean value kept);
    "revenue_share": sum of the recalled clicks' bids over the sum of all clicks' bids (NaN when
    that is 0), the value-weighted click coverage.
  """
  bids = np.asarray(bids, dtype=np.float64)
  if bids.size == 0:
    raise ValueError("No examples to average")
  kept = float(np.sum(bids * _found(recalled, positives)))
  total = float(np.sum(bids))
  return {"revenue_per_query": kept / bids.size, "revenue_share": kept / total if total > 0 else float("nan")}


def ilad(recalled: np.ndarray, item_embeddings: np.ndarray, chunk_size: int = 1024) -> float:
  """Intra-list average distance: the mean over lists of the mean pairwise cosine distance in a list.

  The distance of two items is 1 - cosine similarity of their embeddings (0 for the same direction,
  up to 2 for opposite ones; an all-zero embedding is at distance 1 from everything). Each list's
  valid items (not -1) form m (m - 1) / 2 pairs; lists with fewer than 2 valid items are skipped.
  The sum of a list's pairwise cosines is computed from the sum of its unit vectors, so the cost is
  O(n K d) and the memory one chunk of [chunk_size, K, d] (about 60 MB at K = 50, d = 64).

  Args:
    recalled: int [n, K] item rows recalled for each query; -1 is padding.
    item_embeddings: float [N, d] embedding of every catalog row.
    chunk_size: lists embedded at a time.

  Returns:
    The mean over lists with at least 2 valid items; NaN when there is none.
  """
  recalled = np.asarray(recalled)
  item_embeddings = np.asarray(item_embeddings)
  total, lists = 0.0, 0
  for start in range(0, len(recalled), chunk_size):
    rows = recalled[start : start + chunk_size]
    valid = rows >= 0
    m = valid.sum(axis=1)
    units = item_embeddings[np.where(valid, rows, 0)].astype(np.float64)
    units /= np.maximum(np.linalg.norm(units, axis=2, keepdims=True), 1e-12)
    units *= valid[:, :, np.newaxis]
    summed = units.sum(axis=1)
    # Sum over ordered pairs i != j of u_i . u_j = |sum of u_i|^2 - sum of |u_i|^2.
    pair_cosines = np.einsum("nd,nd->n", summed, summed) - np.einsum("nkd,nkd->n", units, units)
    enough = m >= 2
    pairs = (m * (m - 1))[enough]
    total += float(np.sum(1.0 - pair_cosines[enough] / pairs))
    lists += int(enough.sum())
  return total / lists if lists else float("nan")


def category_coverage(recalled: np.ndarray, item_categories: np.ndarray) -> float:
  """Mean number of distinct categories per recalled list, a coarse diversity measure.

  It counts categories, not items: a list of K ads all in one category scores 1 whatever K is. A
  list made only of padding (-1) has no category and counts as 0.

  Args:
    recalled: int [n, K] item rows recalled for each query; -1 is padding.
    item_categories: [N] category of every catalog row.
  """
  recalled = np.asarray(recalled)
  if len(recalled) == 0:
    raise ValueError("No lists to average")
  valid = recalled >= 0
  # Dense codes of the recalled items' categories only (-1 for padding), then distinct codes per row.
  codes = np.full(recalled.shape, -1, dtype=np.int64)
  codes[valid] = np.unique(np.asarray(item_categories)[recalled[valid]], return_inverse=True)[1].reshape(-1)
  codes = np.sort(codes, axis=1)
  first = codes >= 0
  first[:, 1:] &= codes[:, 1:] != codes[:, :-1]
  return float(first.sum(axis=1).mean())


def diversity_metrics(
  recalled: np.ndarray,
  item_categories: np.ndarray,
  item_embeddings: np.ndarray | None = None,
  ks: tuple[int, ...] = (10, 50),
) -> dict[str, float]:
  """Diversity of the top K of each recalled list, for each K of `ks` no longer than the lists.

  Args:
    recalled: int [n, K] item rows recalled for each query, best first; -1 is padding.
    item_categories: [N] category of every catalog row.
    item_embeddings: optional float [N, d] embedding of every catalog row.
    ks: cut-offs; those above K are left out.

  Returns:
    "categories@k" (`category_coverage`) and, with `item_embeddings`, "ilad@k" (`ilad`).
  """
  recalled = np.asarray(recalled)
  out: dict[str, float] = {}
  for k in ks:
    if k > recalled.shape[1]:
      continue
    if item_embeddings is not None:
      out[f"ilad@{k}"] = ilad(recalled[:, :k], item_embeddings)
    out[f"categories@{k}"] = category_coverage(recalled[:, :k], item_categories)
  return out


def water_level_metrics(
  recalled: np.ndarray,
  positives: np.ndarray,
  converted: np.ndarray | None,
  item_categories: np.ndarray,
  new_items: np.ndarray | None,
  *,
  query_categories: np.ndarray | None = None,
  bids: np.ndarray | None = None,
  item_embeddings: np.ndarray | None = None,
  diversity_ks: tuple[int, ...] = (10, 50),
) -> dict[str, float]:
  """Coverage of clicks and conversions, noise ratio, instant recall of new items, and optionally
  the bid value recalled and the lists' diversity.

  Args:
    recalled: int [n, K] recalled item rows per query, best first; -1 is padding.
    positives: int [n] clicked item row per query.
    converted: optional bool [n], the click converted.
    item_categories: [N] category of each catalog row.
    new_items: optional bool [N], the item was added after the training period.
    query_categories: optional [n] category each query is about (the "query_category" field of
      example batches); without it the clicked ad's category stands for it.
    bids: optional float [n] bid of each query's clicked ad (the "bid" field of example batches).
    item_embeddings: optional float [N, d] catalog embeddings, to measure the lists' diversity.
    diversity_ks: cut-offs of the diversity metrics (those above K are left out).

  Returns:
    click_coverage, conversion_coverage (with `converted`), noise_ratio, and with `new_items`:
    new_item_coverage (coverage of clicks on new items), warm_item_coverage and their ratio. With
    `bids`: revenue_per_query and revenue_share (`revenue_proxy`). With `item_embeddings`:
    ilad@k and categories@k for each k of `diversity_ks` (`diversity_metrics`).
  """
  positives = np.asarray(positives)
  if query_categories is None:
    query_categories = np.asarray(item_categories)[positives]
  out = {
    "click_coverage": coverage(recalled, positives),
    "noise_ratio": noise_ratio(recalled, query_categories, item_categories),
  }
  if converted is not None:
    out["conversion_coverage"] = coverage(recalled, positives, converted)
    out["num_conversions"] = int(np.sum(converted))
  if new_items is not None:
    is_new = np.asarray(new_items, dtype=bool)[positives]
    out["new_item_coverage"] = coverage(recalled, positives, is_new)
    out["warm_item_coverage"] = coverage(recalled, positives, ~is_new)
    out["new_to_warm_ratio"] = out["new_item_coverage"] / max(out["warm_item_coverage"], 1e-12)
    out["num_new_item_clicks"] = int(is_new.sum())
  if bids is not None:
    out.update(revenue_proxy(recalled, positives, bids))
  if item_embeddings is not None:
    out.update(diversity_metrics(recalled, item_categories, item_embeddings, diversity_ks))
  return out
