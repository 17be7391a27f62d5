"""Item tables and behaviour sequences: turns a time-ordered event stream into training examples."""

from __future__ import annotations

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
    self.row_of = {}
    for row, ad_id in enumerate(ad_ids):
      if ad_id in self.row_of:
        raise ValueError(f"ad ids in the catalog must be unique: {ad_id!r} is on rows {self.row_of[ad_id]} and {row}")
      self.row_of[ad_id] = row

  def features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: column[rows] for name, column in self._columns.items()}


def iterate_catalog(table: ItemTable, batch_size: int = 65536):
  """Yields (rows, features) over the whole catalog in row order, one batch at a time."""
  for start in range(0, table.num_items, batch_size):
    rows = np.arange(start, min(start + batch_size, table.num_items))
    yield rows, table.features(rows)


def catalog_column(table: ItemTable, name: str) -> np.ndarray:
  """One item feature (e.g. schema.CATEGORY) of every catalog row, in row order."""
  return np.concatenate([features[name] for _, features in iterate_catalog(table)])


class HistoryTracker:
  """Keeps each user's most recent item rows while events stream past in time order.

  The state is compact because it grows with the number of users, whatever the log's length: a
  dict from user key to a dense index, and one int32 [users, history_len] table of recent rows
  (about 0.2 KB a user at history_len 20, where a deque per user costs 1.6 KB). A batch is
  processed with array operations, so events of the same user inside one batch see each other.

  Args:
    history_len: how many recent items a behaviour sequence holds.
  """

  def __init__(self, history_len: int = schema.HISTORY_LEN):
    self.history_len = history_len
    self._index_of: dict = {}
    # Row u holds user u's recent item rows, most recent first, -1 padded; grown by doubling.
    self._recent = np.full([1024, history_len], -1, dtype=np.int32)

  @property
  def num_users(self) -> int:
    return len(self._index_of)

  @property
  def table_bytes(self) -> int:
    """Bytes of the recent-rows table (the user-key dict comes on top)."""
    return self._recent.nbytes

  def observe(self, users: np.ndarray, item_rows: np.ndarray, enters_history: np.ndarray | None = None) -> np.ndarray:
    """Returns each event's history before it [n, history_len] (most recent first, -1 padded).

    Events with `enters_history` set are appended to their user's history afterwards, so later
    events see them. Events must be in time order.
    """
    n, length = len(users), self.history_len
    item_rows = np.asarray(item_rows, dtype=np.int64)
    if n == 0:
      return np.full([0, length], -1, dtype=np.int64)
    if len(item_rows) != n:
      raise ValueError(f"users ({n}) and item_rows ({len(item_rows)}) must have the same length")
    if item_rows.min() < 0 or item_rows.max() > np.iinfo(np.int32).max:
      raise ValueError("item rows must be in [0, 2**31)")
    enters = np.ones(n, dtype=bool) if enters_history is None else np.asarray(enters_history, dtype=bool)
    user_index = self._dense_indices(users)

    # Each user's timeline in this batch: its stored history (oldest first), then its entering events
    # in time order. An event's history is the last `length` entries of its timeline before it.
    order = np.argsort(user_index, kind="stable")
    sorted_users = user_index[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    group_users = sorted_users[starts]
    group_of = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
    stored = self._recent[group_users][:, ::-1]  # oldest first, -1 padded at the front
    stored_len = (stored >= 0).sum(axis=1)
    sorted_enters = enters[order]
    entered_before = np.cumsum(sorted_enters) - sorted_enters  # entering events before, over all groups
    entered_before -= entered_before[starts][group_of]  # ... within the event's own group
    group_entering = np.add.reduceat(sorted_enters.astype(np.int64), starts)

    # Timelines laid end to end: group g owns [offset[g], offset[g] + length + entering[g]).
    offsets = np.r_[0, np.cumsum(length + group_entering)[:-1]]
    timeline = np.empty(int(offsets[-1] + length + group_entering[-1]), dtype=np.int64)
    timeline[(offsets[:, None] + np.arange(length)).ravel()] = stored.ravel()
    entering_sorted = np.flatnonzero(sorted_enters)
    timeline[offsets[group_of[entering_sorted]] + length + entered_before[entering_sorted]] = item_rows[order][
      entering_sorted
    ]

    # Event i's history, most recent first: timeline[end - 1], timeline[end - 2], ... within its group.
    end = offsets[group_of] + length + entered_before
    positions = end[:, None] - 1 - np.arange(length)
    history = timeline[positions]
    # Entries before the stored history's first item are padding.
    first_valid = offsets[group_of] + length - stored_len[group_of]
    history[positions < first_valid[:, None]] = -1
    out = np.empty([n, length], dtype=np.int64)
    out[order] = history

    # Each user's new state: the last `length` entries of its whole timeline, most recent first.
    group_end = offsets + length + group_entering
    new_state = timeline[group_end[:, None] - 1 - np.arange(length)]
    new_state[group_end[:, None] - 1 - np.arange(length) < (offsets + length - stored_len)[:, None]] = -1
    self._recent[group_users] = new_state
    return out

  def _dense_indices(self, users: np.ndarray) -> np.ndarray:
    """Maps user keys to dense indices, adding users not seen before."""
    keys, inverse = np.unique(np.asarray(users), return_inverse=True)
    index_of = self._index_of
    indices = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys.tolist()):
      index = index_of.get(key)
      if index is None:
        index = index_of[key] = len(index_of)
      indices[i] = index
    if len(index_of) > len(self._recent):
      grown = np.full([max(len(index_of), 2 * len(self._recent)), self.history_len], -1, dtype=np.int32)
      grown[: len(self._recent)] = self._recent
      self._recent = grown
    return indices[inverse.reshape(-1)]


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
