"""The index interface shared by every backend, and the registry that builds them by name."""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

import numpy as np
import tensorflow as tf


class SearchResult(NamedTuple):
  """Top-k neighbours of a batch of queries, best first.

  scores: float32 [B, k]; -inf where fewer than k eligible items exist.
  indices: int32 [B, k] rows of the catalog; -1 where fewer than k eligible items exist.
  """

  scores: tf.Tensor
  indices: tf.Tensor


class Index(tf.Module):
  """A nearest-neighbour index that runs inside a TensorFlow graph.

  Two-tower retrieval factorises relevance into a dot product between a query embedding and an item
  embedding, so serving is a maximum-inner-product search over the catalog. An `Index` holds that
  catalog in the form its backend searches fastest, as tracked variables, so it is saved inside the
  same SavedModel as the towers and answers in the same graph call.

  Every index carries an `eligible` mask (one bool per catalog row): ineligible items (paused ads,
  filtered categories) never come back, and a search still returns k items when k eligible ones
  exist. Updating the mask is a variable assignment, so status changes need no rebuild.

  Args:
    num_items: number of catalog rows.
    eligible: optional bool [num_items] mask; all items are eligible when omitted.
    name: module name.
  """

  def __init__(self, num_items: int, eligible: np.ndarray | None = None, name: str | None = None):
    super().__init__(name=name)
    if eligible is None:
      eligible = np.ones([num_items], dtype=bool)
    eligible = np.asarray(eligible, dtype=bool)
    if eligible.shape != (num_items,):
      raise ValueError(f"eligible must have shape [{num_items}], got {eligible.shape}")
    self._num_items = num_items
    self.eligible = catalog_variable(eligible, name="eligible")

  @property
  def num_items(self) -> int:
    return self._num_items

  def search(self, queries: tf.Tensor, k: int, **options: tf.Tensor) -> SearchResult:
    """Returns the k eligible items with the highest dot product with each query [B, d]."""
    raise NotImplementedError

  def search_option_specs(self) -> dict[str, tf.TensorSpec]:
    """Per-request search knobs (e.g. leaves to search) this backend accepts in `search`."""
    return {}

  def save_namespaces(self) -> list[str]:
    """Custom-op namespaces a SavedModel holding this index must whitelist."""
    return []

  def nbytes(self) -> int:
    """Bytes of index data (codes, vectors, partitions), excluding the eligibility mask."""
    raise NotImplementedError


def catalog_variable(value: np.ndarray | tf.Tensor, name: str) -> tf.Variable:
  """A non-trainable variable with one row per catalog item, saved with an unknown number of rows.

  A SavedModel then takes a catalog of any size in its checkpoint, so an index refresh can publish new
  rows under the previous version's graph (no re-tracing, and servers reuse the imported graph).
  """
  value = value if tf.is_tensor(value) else np.asarray(value)
  return tf.Variable(value, trainable=False, name=name, shape=tf.TensorShape([None, *value.shape[1:]]))


def mask_ineligible(scores: tf.Tensor, eligible: tf.Tensor, candidate_rows: tf.Tensor | None = None) -> tf.Tensor:
  """Sets the scores of ineligible items to -inf.

  Args:
    scores: float [B, N] over the whole catalog, or [B, C] over `candidate_rows`.
    eligible: bool [num_items].
    candidate_rows: optional int [B, C] catalog rows that `scores` refer to (-1 means no item).
  """
  if candidate_rows is None:
    keep = tf.broadcast_to(eligible[tf.newaxis, :], tf.shape(scores))
  else:
    safe_rows = tf.maximum(candidate_rows, 0)
    # Gathering from the read value (GatherV2) rather than the variable (ResourceGather, which locks it)
    # measured about 20 us less per single-query search in a session at 1M items.
    keep = tf.logical_and(tf.gather(tf.convert_to_tensor(eligible), safe_rows), candidate_rows >= 0)
  return tf.where(keep, scores, tf.constant(-np.inf, scores.dtype))


def finalize(scores: tf.Tensor, indices: tf.Tensor) -> SearchResult:
  """Casts to the result dtypes and marks -inf slots (no eligible item) with index -1."""
  scores = tf.cast(scores, tf.float32)
  indices = tf.cast(indices, tf.int32)
  indices = tf.where(tf.math.is_finite(scores), indices, tf.constant(-1, tf.int32))
  return SearchResult(scores=scores, indices=indices)


# Backends register lazily as "module:function", so that building a stock-op index never imports
# ScaNN (whose custom ops would otherwise end up required by every SavedModel we write).
_BACKENDS: dict[str, str] = {
    "brute_force": "engine.brute_force:build_brute_force",
    "scann": "engine.scann_index:build_scann",
    "int8": "engine.int8_index:build_int8",
    "binary": "engine.binary_index:build_binary",
    "partitioned": "engine.partitioned_index:build_partitioned",
}


def register_backend(name: str, target: str) -> None:
  """Registers a builder given as "module:function" under `name`."""
  _BACKENDS[name] = target


def available_backends() -> list[str]:
  return sorted(_BACKENDS)


def build_index(backend: str, embeddings: np.ndarray, *, k: int, eligible: np.ndarray | None = None,
                tuning_queries: np.ndarray | None = None, **options: Any) -> Index:
  """Builds the named backend over float32 item embeddings [N, d].

  Args:
    backend: one of `available_backends()`.
    embeddings: float32 [N, d] item embeddings, one row per catalog item.
    k: the largest number of neighbours a search will ask for.
    eligible: optional bool [N] mask of items that may be returned.
    tuning_queries: optional float32 [Q, d] held-out query embeddings. Backends that tune search knobs
      for a target recall tune on these; without them they fall back to catalog points, which can
      sit far from where real queries land and so overstate recall.
    **options: backend-specific configuration.
  """
  if backend not in _BACKENDS:
    raise ValueError(f"Unknown index backend {backend!r}; choose one of {available_backends()}")
  module_name, function_name = _BACKENDS[backend].split(":")
  builder: Callable[..., Index] = getattr(importlib.import_module(module_name), function_name)
  embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
  if embeddings.ndim != 2 or embeddings.shape[0] == 0:
    raise ValueError(f"embeddings must be a non-empty [N, d] matrix, got shape {embeddings.shape}")
  return builder(embeddings, k=k, eligible=eligible, tuning_queries=tuning_queries, **options)
