"""Cold-start evaluation: a seeded share of the catalog removed from training entirely.

The held-out items never appear in the training split: examples whose positive is held out are
dropped, they are scrubbed from behaviour sequences (the rest of the sequence moves up), and query
tokens naming them (MovieLens' "item:<id>" context token) are removed. They keep their side info in
the catalog and may be test positives, so the item tower must place them from side info alone.

Sources whose queries are derived from the behaviour sequence (MovieLens: the latest rated movie
plays the query) also take the held-out rows when they build their examples, so that no query is
ever made from a held-out item; scrubbing afterwards could not rebuild those queries.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from models.data import schema

# Query tokens that name an item: the id itself, or MovieLens' "item:<id>" context token.
_ITEM_TOKEN_PREFIXES = ("", "item:")


def choose_held_out(num_items: int, fraction: float, seed: int = 0) -> np.ndarray:
  """bool [num_items]: the rows held out of training, a seeded uniform choice of about `fraction`."""
  if not 0 < fraction < 1:
    raise ValueError(f"held-out item fraction must be in (0, 1), got {fraction}")
  return np.random.default_rng(seed).random(num_items) < fraction


def _compact(values: np.ndarray, drop: np.ndarray) -> np.ndarray:
  """Removes the `drop` positions of each row of values [n, L], shifting the rest left, padding with PAD."""
  order = np.argsort(drop, axis=1, kind="stable")
  out = np.take_along_axis(values, order, axis=1).copy()
  out[np.take_along_axis(drop, order, axis=1)] = schema.PAD
  return out


class HeldOutItems:
  """Wraps a data source so that `fraction` of its items is absent from the training split.

  Everything else (catalog, test split, source-specific methods) is the wrapped source's.

  Args:
    source: the data source (`sources.Source`).
    fraction: share of catalog rows held out, chosen uniformly with `seed`.
    seed: NumPy seed of the choice.
  """

  def __init__(self, source: Any, fraction: float, seed: int = 0):
    self._source = source
    self.num_items = source.num_items
    self.held_out_rows = choose_held_out(source.num_items, fraction, seed)
    held_ids = source.features(np.flatnonzero(self.held_out_rows))[schema.AD_ID]
    self._held_ids = frozenset(str(i) for i in held_ids)
    self._held_tokens = frozenset(prefix + i for i in self._held_ids for prefix in _ITEM_TOKEN_PREFIXES)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._source, name)

  def is_held_out(self, ad_ids: np.ndarray) -> np.ndarray:
    """bool array of the shape of ad_ids: the id is held out of training."""
    flat = [str(i) in self._held_ids for i in np.asarray(ad_ids).ravel().tolist()]
    return np.asarray(flat, dtype=bool).reshape(np.shape(ad_ids))

  def examples(self, split: str, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """The wrapped source's batches; in "train", without any trace of the held-out items."""
    for batch in self._source.examples(split, **kwargs):
      yield self._scrub(batch) if split == "train" else batch

  def _scrub(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = ~self.is_held_out(batch[schema.AD_ID])
    batch = {name: values[keep] for name, values in batch.items()}
    drop = self.is_held_out(batch[schema.HIST_IDS])
    for name in schema.HISTORY_FEATURES:
      batch[name] = _compact(batch[name], drop)
    tokens = batch[schema.QUERY_TOKENS]
    named = np.asarray([str(t) in self._held_tokens for t in tokens.ravel().tolist()], dtype=bool)
    batch[schema.QUERY_TOKENS] = _compact(tokens, named.reshape(tokens.shape))
    return batch
