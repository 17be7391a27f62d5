"""Item tables and behaviour sequences: turns a time-ordered event stream into training examples."""

from __future__ import annotations

import collections
from typing import Protocol

import numpy as np

from models.data import schema


class ItemTable(Protocol):
  """Item side info addressed by catalog row (0..num_items-1)."""

  num_items: int

  def features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """AD_ID, CATEGORY, BRAND, STATUS as [n] and AD_TOKENS as [n, AD_TOKENS_LEN] object arrays."""
    ...


class InMemoryItemTable:
  """An `ItemTable` over arrays that fit in memory (MovieLens, a user's catalog file).

  Args:
    ad_ids, categories, brands, statuses: [N] strings.
    tokens: one token list per item.
  """

  def __init__(
    self,
    ad_ids: list[str],
    categories: list[str],
    brands: list[str],
    tokens: list[list[str]],
    statuses: list[str] | None = None,
  ):
    self.num_items = len(ad_ids)
    self._columns = {
      schema.AD_ID: np.asarray(ad_ids, dtype=object),
      schema.CATEGORY: np.asarray(categories, dtype=object),
      schema.BRAND: np.asarray(brands, dtype=object),
      schema.AD_TOKENS: schema.pad_tokens(tokens, schema.AD_TOKENS_LEN),
      schema.STATUS: np.asarray(statuses or ["active"] * len(ad_ids), dtype=object),
    }
    self.row_of = {ad_id: row for row, ad_id in enumerate(ad_ids)}
    if len(self.row_of) != self.num_items:
      raise ValueError("ad ids in the catalog must be unique")

  def features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: column[rows] for name, column in self._columns.items()}


def iterate_catalog(table: ItemTable, batch_size: int = 65536):
  """Yields (rows, features) over the whole catalog in row order, one batch at a time."""
  for start in range(0, table.num_items, batch_size):
    rows = np.arange(start, min(start + batch_size, table.num_items))
    yield rows, table.features(rows)


class HistoryTracker:
  """Keeps each user's most recent item rows while events stream past in time order.

  Args:
    history_len: how many recent items a behaviour sequence holds.
  """

  def __init__(self, history_len: int = schema.HISTORY_LEN):
    self.history_len = history_len
    self._recent: dict = collections.defaultdict(lambda: collections.deque(maxlen=history_len))

  def observe(self, users: np.ndarray, item_rows: np.ndarray, enters_history: np.ndarray | None = None) -> np.ndarray:
    """Returns each event's history before it [n, history_len] (most recent first, -1 padded).

    Events with `enters_history` set are appended to their user's history afterwards, so later
    events see them. Events must be in time order.
    """
    if enters_history is None:
      enters_history = np.ones(len(users), dtype=bool)
    out = np.full([len(users), self.history_len], -1, dtype=np.int64)
    for i, (user, row, enters) in enumerate(zip(users.tolist(), item_rows.tolist(), enters_history.tolist())):
      recent = self._recent[user]
      if recent:
        out[i, : len(recent)] = list(reversed(recent))
      if enters:
        recent.append(row)
    return out


def history_features(table: ItemTable, hist_rows: np.ndarray) -> dict[str, np.ndarray]:
  """Looks up the side info of history rows [n, L]; -1 rows become padding."""
  valid = hist_rows >= 0
  out = {name: np.full(hist_rows.shape, schema.PAD, dtype=object) for name in schema.HISTORY_FEATURES}
  if valid.any():
    item = table.features(hist_rows[valid])
    for name, item_name in schema.HISTORY_FEATURES.items():
      out[name][valid] = item[item_name]
  return out


def make_examples(
  table: ItemTable,
  *,
  user_ids: np.ndarray,
  user_features: np.ndarray,
  query_tokens: np.ndarray,
  hist_rows: np.ndarray,
  item_rows: np.ndarray,
) -> dict[str, np.ndarray]:
  """Joins query features, behaviour sequences and the positive item's features into one batch."""
  item = table.features(item_rows)
  examples = {
    schema.USER_ID: np.asarray(user_ids, dtype=object),
    schema.USER_FEATURES: user_features,
    schema.QUERY_TOKENS: query_tokens,
    **history_features(table, hist_rows),
  }
  examples.update({name: item[name] for name in schema.ITEM_FEATURE_NAMES})
  return examples
