"""An item-to-item co-occurrence (ItemCF) recall channel, fused with the towers' search in one graph.

Recall stacks usually run an item-to-item channel beside the two-tower one: on time-ordered logs,
items taken together with the user's latest ones are a strong signal that a dot product of two
embeddings only approximates. Here that channel runs in the same call: each history item's most
co-occurring items (a table fit on the training log) vote with recency weights, and the towers' list
and the channel's list are merged by reciprocal rank fusion (RRF), which needs no calibration between
a dot product and a co-occurrence weight.

The table is keyed by 63-bit fingerprints of item ids, not catalog rows, so it survives catalog
changes: only the fingerprint-to-row lookup is catalog-sized, and fgr-refresh rewrites it with the
ids (`catalog_values`). Items the catalog no longer holds, or holds paused, are never returned.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from engine import base

# Object paths below the channel.
KEYS = "keys"
NEIGHBOURS = "neighbours"
WEIGHTS = "weights"
CATALOG_FINGERPRINTS = "catalog_fingerprints"
CATALOG_ROWS = "catalog_rows"
# The attributes of `NeighbourTable`, saved at these paths below the channel.
TABLE_PATHS = (KEYS, NEIGHBOURS, WEIGHTS)
# Prefix (below the channel) shared by the catalog-sized lookup variables only.
CATALOG_PREFIX = "catalog_"

# Reciprocal rank fusion's constant (Cormack et al., 2009): a list's item at rank r adds 1 / (60 + r).
RRF_CONSTANT = 60.0


def fingerprints(ids: tf.Tensor | np.ndarray) -> tf.Tensor:
  """int64 63-bit FarmHash fingerprints of string ids: how the graph compares ids (here and in exclusions)."""
  return tf.strings.to_hash_bucket_fast(ids, np.iinfo(np.int64).max)


@dataclasses.dataclass(frozen=True)
class NeighbourTable:
  """Each item's most co-occurring items, by id fingerprint.

  keys: int64 [V] sorted fingerprints of the items that have neighbours.
  neighbours: int64 [V, K] fingerprints of each key's neighbours, best first (0 pads).
  weights: float32 [V, K] their co-occurrence weights (0 pads).
  """

  keys: np.ndarray
  neighbours: np.ndarray
  weights: np.ndarray

  @classmethod
  def from_ids(cls, ids: np.ndarray, neighbour_ids: np.ndarray, weights: np.ndarray) -> NeighbourTable:
    """The table of string `ids` [V] whose neighbours are `neighbour_ids` [V, K] ("" pads) with `weights`."""
    ids, neighbour_ids = base.string_array(ids), base.string_array(neighbour_ids)
    weights = np.asarray(weights, dtype=np.float32)
    if neighbour_ids.ndim != 2 or neighbour_ids.shape != weights.shape or len(ids) != len(neighbour_ids):
      raise ValueError(
        f"need ids [V] and neighbours and weights [V, K], got {ids.shape}, {neighbour_ids.shape}, {weights.shape}"
      )
    if len(ids) == 0 or neighbour_ids.shape[1] == 0:
      raise ValueError("a co-occurrence table needs at least one item with one neighbour")
    if len(set(ids.tolist())) != len(ids):
      raise ValueError("co-occurrence table ids must be unique")
    padding = neighbour_ids == ""
    keys = fingerprints(ids).numpy()
    neighbours = np.where(padding, 0, fingerprints(neighbour_ids).numpy())
    weights = np.where(padding, 0.0, weights).astype(np.float32)
    order = np.argsort(keys)
    return cls(keys[order], neighbours[order], weights[order])


def catalog_lookup(item_ids: np.ndarray) -> dict[str, np.ndarray]:
  """The catalog-sized lookup variables (by path below the channel) that map fingerprints to rows of `item_ids`."""
  keys = fingerprints(base.string_array(item_ids)).numpy()
  order = np.argsort(keys, kind="stable")
  return {CATALOG_FINGERPRINTS: keys[order], CATALOG_ROWS: order.astype(np.int32)}


def _lookup(sorted_keys: tf.Tensor, values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(positions, found) of int64 `values` (any shape) in the sorted 1-D `sorted_keys`."""
  flat = tf.reshape(values, [1, -1])
  positions = tf.searchsorted(sorted_keys[tf.newaxis, :], flat, side="left", out_type=tf.int32)
  positions = tf.minimum(positions, tf.maximum(tf.size(sorted_keys, out_type=tf.int32) - 1, 0))
  found = tf.equal(tf.gather(sorted_keys, positions), flat)
  return tf.reshape(positions, tf.shape(values)), tf.reshape(found, tf.shape(values))


class CooccurrenceChannel(tf.Module):
  """Scores catalog items by their co-occurrence with a request's recent history items.

  A request's score for item j is sum_t decay^t * weight(h_t, j) over its `history` most recent items
  h_0 (latest), h_1, ... (the same rule as `models.baselines.ItemCooccurrence`, over each item's top
  K neighbours only). Ties keep catalog row order.

  Args:
    table: the neighbour table fit on the training log.
    item_ids: string [N] ids of the catalog rows.
    history_feature: the string query feature [B, L] of recent item ids, most recent first.
    history: how many of the most recent items vote.
    decay: weight ratio of each older item to the one after it.
  """

  def __init__(self, table: NeighbourTable, item_ids: np.ndarray, history_feature: str, history: int, decay: float):
    super().__init__(name="cooccurrence")
    if history < 1 or not 0 < decay <= 1:
      raise ValueError(f"need history >= 1 and decay in (0, 1], got {history} and {decay}")
    self.history_feature = history_feature
    self.history = history
    self.decay = decay
    self.keys = tf.Variable(table.keys, trainable=False, name=KEYS)
    self.neighbours = tf.Variable(table.neighbours, trainable=False, name=NEIGHBOURS)
    self.weights = tf.Variable(table.weights, trainable=False, name=WEIGHTS)
    lookup = catalog_lookup(item_ids)
    self.catalog_fingerprints = base.catalog_variable(lookup[CATALOG_FINGERPRINTS], name=CATALOG_FINGERPRINTS)
    self.catalog_rows = base.catalog_variable(lookup[CATALOG_ROWS], name=CATALOG_ROWS)

  @property
  def config(self) -> dict[str, object]:
    """What a version report records to rebuild this channel around a saved table."""
    return {
      "history_feature": self.history_feature,
      "history": self.history,
      "decay": self.decay,
      "neighbours": int(self.neighbours.shape[1]),
    }

  def search(self, history_ids: tf.Tensor, depth: int, eligible: tf.Tensor) -> base.SearchResult:
    """The `depth` eligible catalog rows [B, depth] co-occurring most with each request's history, best first.

    Rows with no co-occurring item left are -1 with score -inf, as an index pads.
    """
    recent = history_ids[:, : self.history]
    batch, length = tf.shape(recent)[0], tf.shape(recent)[1]
    keys = tf.convert_to_tensor(self.keys)
    positions, found = _lookup(keys, fingerprints(recent))
    found = tf.logical_and(found, tf.not_equal(recent, ""))
    recency = tf.pow(tf.constant(self.decay, tf.float32), tf.cast(tf.range(length), tf.float32))
    weights = tf.gather(tf.convert_to_tensor(self.weights), positions)  # [B, L, K]
    weights *= tf.where(found, recency[tf.newaxis, :], 0.0)[:, :, tf.newaxis]
    neighbours = tf.gather(tf.convert_to_tensor(self.neighbours), positions)
    catalog_positions, in_catalog = _lookup(tf.convert_to_tensor(self.catalog_fingerprints), neighbours)
    rows = tf.gather(tf.convert_to_tensor(self.catalog_rows), catalog_positions)
    keep = tf.logical_and(in_catalog, weights > 0)
    keep = tf.logical_and(keep, tf.gather(tf.convert_to_tensor(eligible), rows))
    width = length * tf.shape(neighbours)[2]
    rows = tf.reshape(tf.where(keep, rows, -1), [batch, width])
    weights = tf.reshape(tf.where(keep, weights, 0.0), [batch, width])
    # One score per distinct row: sort each request's votes by row, then sum each run of equal rows.
    # (Equal rows are summed, so their order does not matter: the unstable sort measured 1.8x faster.)
    order = tf.argsort(rows, axis=1)
    rows, weights = tf.gather(rows, order, batch_dims=1), tf.gather(weights, order, batch_dims=1)
    # (ones_like keeps a request without history, width 0, at width 0.)
    starts = tf.concat([tf.ones_like(rows[:, :1], tf.bool), tf.not_equal(rows[:, 1:], rows[:, :-1])], axis=1)
    offsets = (tf.range(batch) * width)[:, tf.newaxis]
    segments = tf.reshape(tf.cumsum(tf.cast(starts, tf.int32), axis=1) - 1 + offsets, [-1])
    totals = tf.reshape(
      tf.math.unsorted_segment_sum(tf.reshape(weights, [-1]), segments, batch * width), [batch, width]
    )
    # Empty segments (past each request's last distinct row) come back as int32's minimum: no item.
    segment_rows = tf.reshape(
      tf.math.unsorted_segment_max(tf.reshape(rows, [-1]), segments, batch * width), [batch, width]
    )
    scores = tf.where(tf.logical_and(segment_rows >= 0, totals > 0), totals, -np.inf)
    # Requests whose history has fewer votes than `depth` leave the remaining columns empty.
    padding = tf.maximum(depth - width, 0)
    scores = tf.pad(scores, [[0, 0], [0, padding]], constant_values=-np.inf)
    segment_rows = tf.pad(segment_rows, [[0, 0], [0, padding]], constant_values=-1)
    top = tf.math.top_k(scores, k=depth, sorted=True)
    return base.finalize(top.values, tf.gather(segment_rows, top.indices, batch_dims=1))


def reciprocal_rank_fusion(
  first_rows: tf.Tensor,
  first_keep: tf.Tensor,
  second_rows: tf.Tensor,
  second_keep: tf.Tensor,
  first_weight: float | tf.Tensor,
  k: int,
) -> base.SearchResult:
  """Merges two best-first candidate lists [B, D1] and [B, D2] of catalog rows into one top-k.

  An item at rank r (from 1, counting kept candidates only) of a list earns that list's weight
  / (RRF_CONSTANT + r); an item in both lists earns both. Rank fusion needs no common scale between
  the lists' scores, which a dot product and a co-occurrence weight do not share.

  Returns:
    fused scores and rows [B, k], best first; -inf and -1 where fewer than k candidates exist.
  """

  def contributions(keep: tf.Tensor, weight: float | tf.Tensor) -> tf.Tensor:
    ranks = tf.cast(tf.cumsum(tf.cast(keep, tf.int32), axis=1), tf.float32)
    return tf.where(keep, weight / (RRF_CONSTANT + ranks), 0.0)

  first_scores = contributions(first_keep, first_weight)
  second_scores = contributions(second_keep, 1.0 - first_weight)
  both = tf.logical_and(
    tf.equal(first_rows[:, :, tf.newaxis], second_rows[:, tf.newaxis, :]),
    tf.logical_and(first_keep[:, :, tf.newaxis], second_keep[:, tf.newaxis, :]),
  )
  first_scores += tf.reduce_sum(tf.where(both, second_scores[:, tf.newaxis, :], 0.0), axis=2)
  second_only = tf.logical_and(second_keep, tf.logical_not(tf.reduce_any(both, axis=1)))
  rows = tf.concat([first_rows, second_rows], axis=1)
  scores = tf.concat(
    [tf.where(first_keep, first_scores, -np.inf), tf.where(second_only, second_scores, -np.inf)], axis=1
  )
  top = tf.math.top_k(scores, k=k, sorted=True)
  return base.finalize(top.values, tf.gather(rows, top.indices, batch_dims=1))
