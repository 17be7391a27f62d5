"""Picks a built ScaNN searcher's search knobs: the fastest setting that reaches a target recall."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import tensorflow as tf

from engine import scann_config, search_ops


def tune_search_knobs(
  searcher: Any,
  embeddings: np.ndarray,
  config: scann_config.ScannConfig,
  k: int,
  reorder_choices: list[int],
  tuning_queries: np.ndarray | None,
) -> dict[str, Any]:
  """Picks the fastest (leaves_to_search, reorder) whose recall@k reaches the target (plus margin).

  Reorder sizes are tried largest first: for each, the smallest leaves_to_search reaching the target
  is found on a geometric ladder with batched searches, then narrowed by bisection between the ladder
  step that reached it and the one below, to 5% (the ladder's steps are up to 50% apart, and scanned
  leaves are most of a large catalog's search cost). A smaller reorder needs at least as many
  leaves, and leaves cost more than reordering, so it is only tried up to twice the leaves the
  previous size needed; a size that cannot get there ends the search. The qualifying settings are
  then timed on single queries (what serving sees), interleaved, and the fastest wins. Without
  `tuning_queries`, catalog rows stand in for queries. The exact reference is a TF matmul + top_k.
  """
  tuning_queries = search_ops.tuning_queries_or_sample(
    embeddings, tuning_queries, config.num_tuning_queries, config.seed
  )
  truth = search_ops.exact_top_k_tf(tuning_queries, embeddings, k)
  num_leaves = config.num_leaves
  # Margin for unseen queries: recall on the tuning queries overstates held-out recall, and more tuning
  # queries do not shrink the gap (docs/history/benchmarks-2026-11.md, ScaNN tuned on real queries).
  target = min(1.0, config.target_recall + 0.015)
  ladder = sorted(
    {
      max(1, int(round(num_leaves * f)))
      for f in (
        0.005,
        0.0075,
        0.01,
        0.0125,
        0.015,
        0.0175,
        0.02,
        0.025,
        0.03,
        0.035,
        0.04,
        0.05,
        0.06,
        0.08,
        0.1,
        0.15,
        0.2,
        0.3,
        0.5,
        1.0,
      )
    }
  )
  queries = tf.constant(tuning_queries)
  settings, best, max_leaves = [], None, num_leaves

  def measure(leaves: int, reorder: int) -> dict[str, Any]:
    nonlocal best
    rows, _ = searcher.search_batched_parallel(
      queries, final_num_neighbors=k, pre_reorder_num_neighbors=reorder, leaves_to_search=leaves
    )
    setting = {
      "leaves_to_search": leaves,
      "reorder": reorder,
      "tuned_recall": search_ops.recall_at_k(rows.numpy(), truth),
    }
    if best is None or setting["tuned_recall"] > best["tuned_recall"]:
      best = setting
    return setting

  for reorder in sorted(reorder_choices, reverse=True):
    reached, below = None, 0
    for leaves in [value for value in ladder if value <= max_leaves]:
      setting = measure(leaves, reorder)
      if setting["tuned_recall"] >= target:
        reached = setting
        break
      below = leaves
    if reached is None:
      break
    while reached["leaves_to_search"] - below > max(1, reached["leaves_to_search"] // 20):
      setting = measure((below + reached["leaves_to_search"]) // 2, reorder)
      if setting["tuned_recall"] >= target:
        reached = setting
      else:
        below = setting["leaves_to_search"]
    settings.append(reached)
    max_leaves = 2 * reached["leaves_to_search"]
  if not settings:
    return best
  singles = [queries[i] for i in range(min(100, tuning_queries.shape[0]))]
  times = [[] for _ in settings]
  for _ in range(2):  # Interleaved rounds, so load drift hits every setting alike.
    for setting, setting_times in zip(settings, times):
      start = time.perf_counter()
      for query in singles:
        searcher.search(
          query,
          final_num_neighbors=k,
          pre_reorder_num_neighbors=setting["reorder"],
          leaves_to_search=setting["leaves_to_search"],
        )
      setting_times.append((time.perf_counter() - start) / len(singles) * 1e3)
  for setting, setting_times in zip(settings, times):
    setting["tuned_latency_ms"] = min(setting_times)
  return min(settings, key=lambda s: s["tuned_latency_ms"])
