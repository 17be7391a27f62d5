"""Classical baselines every quality report sets beside the towers: popularity and item co-occurrence.

A learned retrieval model has to beat counting on the split production uses. On time-ordered data
the bar is item-to-item co-occurrence over the user's recent history (ItemCF): items that users
interacted with close together in time are recalled for whoever just interacted with one of them.
Both baselines are fit on the training split only, read the same test examples as the towers (their
behaviour sequence) and score the whole catalog, so their ranks compare with the towers' exactly.

Written here in NumPy: TFRS ships no classical baselines, and each is a few array operations; the
co-occurrence table is a hand-built CSR matrix because SciPy is not a dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

from models.data import schema

RowOf = Callable[[str], int]
# Scores a baseline computes at once (queries x catalog items): 128 MB of float64.
MAX_SCORES = 1 << 24


def catalog_rows(ids: np.ndarray, row_of: RowOf) -> np.ndarray:
  """Catalog rows of string ids; padding ("") becomes -1."""
  flat = [row_of(str(i)) if i != schema.PAD else -1 for i in np.asarray(ids).ravel().tolist()]
  return np.asarray(flat, dtype=np.int64).reshape(np.shape(ids))


class Popularity:
  """Scores every item by its number of training interactions (ties by catalog row)."""

  name = "popularity"

  def __init__(self, num_items: int):
    self.num_items = num_items
    self.set_counts(np.zeros(num_items, dtype=np.float64))

  def fit(self, examples: Iterable[dict[str, np.ndarray]], row_of: RowOf) -> Popularity:
    counts = np.zeros(self.num_items, dtype=np.float64)
    for batch in examples:
      counts += np.bincount(catalog_rows(batch[schema.AD_ID], row_of), minlength=self.num_items)
    self.set_counts(counts)
    return self

  def set_counts(self, counts: np.ndarray) -> None:
    """Takes each item's training interactions [num_items] and ranks the items by them.

    `tie_break` is that ranking scaled into [0, 1e-3) (equal counts: lower row first), this
    baseline's scores; `by_popularity` lists the rows best first, for `break_ties`.
    """
    self.counts = np.asarray(counts, dtype=np.float64)
    order = self.counts - np.arange(self.num_items) / (2.0 * self.num_items)
    self.by_popularity = np.argsort(-order, kind="stable")
    self.tie_break = 1e-3 * np.argsort(np.argsort(order)) / self.num_items

  def break_ties(self, scores: np.ndarray) -> np.ndarray:
    """Scores [n, num_items] replaced by ranking values (num_items - 1 for the best, down to 0) that order
    the items by those scores and only equal scores by popularity.

    Adding `tie_break` to another score instead reorders any two items whose scores differ by less
    than 1e-3: item co-occurrence's do for about 1,100 pairs of a MovieLens query.
    """
    n, size = scores.shape
    out = np.empty([n, size], dtype=np.float64)
    values = np.broadcast_to(np.arange(size - 1, -1, -1, dtype=np.float64), (n, size))
    # A stable sort of the columns laid out best-popularity first keeps that order within ties. Rows a
    # chunk at a time: the sort's copies would otherwise be several times the scores' size.
    step = max(1, (1 << 20) // max(size, 1))
    for start in range(0, n, step):
      chunk = scores[start : start + step, self.by_popularity]
      order = self.by_popularity[np.argsort(-chunk, axis=1, kind="stable")]
      np.put_along_axis(out[start : start + step], order, values[start : start + step], axis=1)
    return out

  def scores(self, batch: dict[str, np.ndarray], row_of: RowOf) -> np.ndarray:
    del row_of  # The same ranking for every query.
    return np.broadcast_to(self.tie_break, (len(batch[schema.AD_ID]), self.num_items))


class ItemCooccurrence:
  """ItemCF over each user's recent history, with recency weights and cosine-normalised counts.

  sim(i, j) = c(i, j) / sqrt(n_i * n_j), where c(i, j) counts the times one user interacted with i and
  j within `window` interactions of each other in the training log, and n_i is i's interaction
  count. A user who takes i twice within the window makes i co-occur with itself (c(i, i) counts each
  such pair once), so a repeated item can be recalled again by its own history. A query's score for
  item j is sum_t decay^t * sim(h_t, j) over its `history` most recent items h_0 (latest), h_1, ...
  (`similarity`); equal scores (as of items co-occurring with none of them) fall back to popularity
  (`scores`).

  Args:
    num_items: catalog size.
    window: how many interactions apart two items of one user still co-occur.
    history: how many of the query's most recent items vote.
    decay: weight ratio of each older item to the one after it.
  """

  name = "item_cooccurrence"

  def __init__(self, num_items: int, window: int = 20, history: int = 10, decay: float = 0.8):
    if window < 1 or history < 1 or not 0 < decay <= 1:
      raise ValueError(f"need window >= 1, history >= 1 and decay in (0, 1], got {window}, {history}, {decay}")
    self.num_items = num_items
    self.window = window
    self.history = history
    self.decay = decay
    self.popularity = Popularity(num_items)

  def fit(self, examples: Iterable[dict[str, np.ndarray]], row_of: RowOf) -> ItemCooccurrence:
    users, rows = [], []
    # Users as integers numbered by first appearance: a fixed-width copy of every event's user id would
    # be as wide as the longest id.
    number: dict[str | bytes, int] = {}
    for batch in examples:
      numbered = [number.setdefault(user, len(number)) for user in np.asarray(batch[schema.USER_ID]).tolist()]
      users.append(np.asarray(numbered, np.int64))
      rows.append(catalog_rows(batch[schema.AD_ID], row_of))
    user, row = np.concatenate(users), np.concatenate(rows)
    order = np.argsort(user, kind="stable")  # Each user's interactions together, still in time order.
    user, row = user[order], row[order]
    self.popularity.set_counts(np.bincount(row, minlength=self.num_items))
    # Counted one distance at a time and merged, so memory holds one distance's pairs and the table,
    # not all 2 * window pairs of every event at once.
    pairs, counts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    for distance in range(1, self.window + 1):
      same = user[distance:] == user[:-distance]
      first, second = row[:-distance][same], row[distance:][same]
      # Both directions of a pair of two items, and a user's repeat of one item (i = j) once, as c(i, i)
      # counts it: its mirror is the same pair, which counted twice would double every repeat's weight.
      mirrored = (second * self.num_items + first)[first != second]
      step, step_counts = np.unique(np.concatenate([first * self.num_items + second, mirrored]), return_counts=True)
      pairs, where = np.unique(np.concatenate([pairs, step]), return_inverse=True)
      counts = np.bincount(where, weights=np.concatenate([counts, step_counts]), minlength=len(pairs))
    first, second = np.divmod(pairs, self.num_items)
    norm = np.sqrt(np.maximum(self.popularity.counts[first] * self.popularity.counts[second], 1.0))
    self.indptr = np.searchsorted(first, np.arange(self.num_items + 1))  # CSR over `first` (sorted).
    self.columns = second
    self.values = counts / norm
    return self

  def top_neighbours(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each item's `count` most similar items: what a served co-occurrence channel keeps of the table.

    Returns:
      (rows [V] of the items co-occurring with any, their neighbours' rows [V, count] best first
      (-1 pads), and the similarities [V, count] (0 pads)).
    """
    if count < 1:
      raise ValueError(f"count must be at least 1, got {count}")
    lengths = np.diff(self.indptr)
    first = np.repeat(np.arange(self.num_items), lengths)
    order = np.lexsort((self.columns, -self.values, first))  # By item, then best first (ties by row).
    rank = np.arange(len(order)) - np.repeat(self.indptr[:-1], lengths)
    within = rank < count
    kept, rank = order[within], rank[within]
    rows = np.flatnonzero(lengths)
    slot = np.searchsorted(rows, first[kept])
    neighbours = np.full([len(rows), count], -1, dtype=np.int64)
    similarities = np.zeros([len(rows), count], dtype=np.float32)
    neighbours[slot, rank] = self.columns[kept]
    similarities[slot, rank] = self.values[kept]
    return rows, neighbours, similarities

  def scores(self, batch: dict[str, np.ndarray], row_of: RowOf) -> np.ndarray:
    """Ranking values [n, num_items]: by `similarity`, equal ones by popularity (`Popularity.break_ties`)."""
    return self.popularity.break_ties(self.similarity(batch, row_of))

  def similarity(self, batch: dict[str, np.ndarray], row_of: RowOf) -> np.ndarray:
    """Each query's recency-weighted co-occurrence with every item [n, num_items] (0: none)."""
    recent = catalog_rows(batch[schema.HIST_IDS][:, : self.history], row_of)
    weights = self.decay ** np.arange(recent.shape[1], dtype=np.float64)
    query, position = np.nonzero(recent >= 0)
    items = recent[query, position]
    starts, lengths = self.indptr[items], self.indptr[items + 1] - self.indptr[items]
    total = int(lengths.sum())
    # Every (query, co-occurring item) contribution, gathered from the CSR rows of the query's items.
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    entries = np.repeat(starts, lengths) + offsets
    flat = np.repeat(query, lengths) * self.num_items + self.columns[entries]
    contribution = np.repeat(weights[position], lengths) * self.values[entries]
    num_queries = len(batch[schema.AD_ID])
    scores = np.bincount(flat, weights=contribution, minlength=num_queries * self.num_items)
    return scores.reshape(num_queries, self.num_items)


class Baseline(Protocol):
  """A model without training that scores the whole catalog for each query of a batch."""

  name: str

  def scores(self, batch: dict[str, np.ndarray], row_of: RowOf) -> np.ndarray:
    """Scores [n, num_items] of the batch's n queries."""
    ...


def fit_baselines(source, examples: Iterable[dict[str, np.ndarray]]) -> list[Baseline]:
  """Popularity and ItemCF fit on a source's training examples, read once.

  ItemCF counts every item's interactions for its own tie-break: that is the popularity baseline.
  """
  cooccurrence = ItemCooccurrence(source.num_items).fit(examples, source.row_of)
  return [cooccurrence.popularity, cooccurrence]
