"""Comparing answers that two execution paths computed with different float rounding.

Two paths that compute the same dot products (a batch or one query at a time, XLA or not, an exported
SavedModel or the in-process model, TensorFlow or NumPy, oneDNN's kernels or Eigen's, 1 or 2 threads)
agree only up to a few float32 ulps, so the order of two items whose scores are that close is a coin
toss. These helpers accept exactly that and nothing more: where two top-k answers differ, the items
they hold must score the same (within `SCORE_ATOL`) under one reference, so they are ties.
"""

from __future__ import annotations

import numpy as np

# The towers' embeddings are unit vectors of 16-32 float32 dims, so a score is at most 1 and its
# rounding error along one path is a few ulps of 1 (1.2e-7 each): 6e-8 was seen between a batch
# and a single row on one CPU, 1.5e-7 between oneDNN and Eigen kernels. 1e-5 leaves a wide margin
# for that, and an item scoring within 1e-5 of the expected one is as good an answer to any check here.
SCORE_ATOL = 1e-5


def reference_scores(queries: np.ndarray, items: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
  """[Q, N] dot products in float64 (no path's float32 rounding), -inf for ineligible items."""
  scores = np.asarray(queries, np.float64) @ np.asarray(items, np.float64).T
  if eligible is not None:
    scores[:, ~np.asarray(eligible, bool)] = -np.inf
  return scores


def assert_top_k_agree(
  found: np.ndarray, expected: np.ndarray, scores: np.ndarray, atol: float = SCORE_ATOL, max_unexplained: float = 0.0
) -> None:
  """Asserts two [Q, k] top-k answers (rows, -1 for none) are the same up to ties under `scores`.

  Position by position, either the rows are equal or both rows' reference scores are within `atol`
  (two items swapped, or a different item at the k-th place, because they tie).

  Args:
    found: [Q, k] int rows, one path's answer.
    expected: [Q, k] int rows, the other path's answer.
    scores: [Q, N] reference scores of every row for every query, e.g. `reference_scores(...)`.
    atol: how close two scores must be to count as a tie.
    max_unexplained: share of the Q * k positions allowed to differ without a tie. 0 for exact
      search. Approximate search (tree leaves, AH candidates) picks its candidates with rounded
      scores too, so one rounding difference can change which candidates are reordered: such
      comparisons allow a small share, far below what a broken path would give.
  """
  found, expected = np.asarray(found), np.asarray(expected)
  assert found.shape == expected.shape, (found.shape, expected.shape)

  def score_of(rows):
    picked = np.take_along_axis(scores, np.maximum(rows, 0).astype(np.int64), axis=1)
    return np.where(rows >= 0, picked, -np.inf)

  found_scores, expected_scores = score_of(found), score_of(expected)
  tie = np.isclose(found_scores, expected_scores, rtol=0, atol=atol) | (
    np.isneginf(found_scores) & np.isneginf(expected_scores)
  )
  unexplained = (found != expected) & ~tie
  if unexplained.mean() > max_unexplained:
    where = np.argwhere(unexplained)[:5]
    details = "; ".join(
      f"query {q} place {j}: row {found[q, j]} ({found_scores[q, j]:.7f}) vs "
      f"row {expected[q, j]} ({expected_scores[q, j]:.7f})"
      for q, j in where
    )
    raise AssertionError(
      f"{unexplained.sum()} of {unexplained.size} top-k places differ without a tie "
      f"(allowed: {max_unexplained:.1%}): {details}"
    )


def rows_of(ids: np.ndarray, catalog_ids: np.ndarray) -> np.ndarray:
  """The catalog rows of an array of ad ids (str or bytes); "" (no result) gives -1, an unknown id KeyError."""
  row_of = {str(ad_id): row for row, ad_id in enumerate(np.asarray(catalog_ids).astype(str))}
  return np.vectorize(lambda ad_id: row_of[ad_id] if ad_id else -1, otypes=[np.int64])(np.asarray(ids).astype(str))
