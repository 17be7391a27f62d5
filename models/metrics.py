"""Offline retrieval metrics in NumPy: Recall/HitRate@K, NDCG@K and Xiaohongshu's "water-level" metrics.

Every evaluation example is one query with one relevant item (the clicked ad), so Recall@K and
HitRate@K coincide per example; both names are reported because papers use either. Ranks are
0-based positions of the relevant item in the full-catalog ranking.
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


def coverage(recalled: np.ndarray, positives: np.ndarray, where: np.ndarray | None = None) -> float:
  """Share of positives found in their query's recalled set, over the examples `where` selects.

  Args:
    recalled: int [n, K] item rows recalled for each query.
    positives: int [n] the clicked (or converted) item row of each query.
    where: optional bool [n] examples to count (e.g. the converted clicks); NaN when none is selected.
  """
  found = np.any(recalled == np.asarray(positives)[:, np.newaxis], axis=1)
  if where is not None:
    found = found[np.asarray(where, dtype=bool)]
  return float(found.mean()) if found.size else float("nan")


def noise_ratio(recalled: np.ndarray, query_categories: np.ndarray, item_categories: np.ndarray) -> float:
  """Share of recalled items whose category differs from the query's category.

  Args:
    recalled: int [n, K] item rows recalled for each query.
    query_categories: [n] the category each query is about (the clicked ad's category).
    item_categories: [N] category of every catalog row.
  """
  return float(np.mean(np.asarray(item_categories)[recalled] != np.asarray(query_categories)[:, np.newaxis]))


def water_level_metrics(
  recalled: np.ndarray,
  positives: np.ndarray,
  converted: np.ndarray | None,
  item_categories: np.ndarray,
  new_items: np.ndarray | None,
) -> dict[str, float]:
  """Coverage of clicks and conversions, noise ratio and instant recall of new items.

  Args:
    recalled: int [n, K] recalled item rows per query.
    positives: int [n] clicked item row per query.
    converted: optional bool [n], the click converted.
    item_categories: [N] category of each catalog row.
    new_items: optional bool [N], the item was added after the training period.

  Returns:
    click_coverage, conversion_coverage (with `converted`), noise_ratio, and with `new_items`:
    new_item_coverage (coverage of clicks on new items), warm_item_coverage and their ratio.
  """
  positives = np.asarray(positives)
  out = {
    "click_coverage": coverage(recalled, positives),
    "noise_ratio": noise_ratio(recalled, np.asarray(item_categories)[positives], item_categories),
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
  return out
