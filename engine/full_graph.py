"""The full graph: query tower, item tower and index in one tf.Module with TF Serving signatures.

One Predict call on `serving_default` takes raw query features and returns the top-k ad ids and
scores, so no separate embedding service or vector database sits between the request and the
candidates. `encode_query` and `encode_item` expose the towers on their own, for refreshing the index
from the same version (new ads embedded by exactly the model that serves them) and for debugging.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from engine import base
from engine import cooccurrence as cooccurrence_lib

SERVING_DEFAULT = "serving_default"
ENCODE_QUERY = "encode_query"
ENCODE_ITEM = "encode_item"
SEARCH_WITH_OPTIONS = "search_with_options"
# search_with_options input of a graph with a co-occurrence channel: the towers' share of the fusion.
FUSION_WEIGHT = "fusion_weight"

Tower = Callable[[dict[str, tf.Tensor]], tf.Tensor]

# Object paths of the catalog in a saved FullGraph (its attributes `index` and `item_ids`).
INDEX = "index"
ITEM_IDS = "item_ids"
COOCCURRENCE = "cooccurrence"


def variable_key(path: str) -> str:
  """The checkpoint key of the variable saved at object path `path`."""
  return f"{path}/.ATTRIBUTES/VARIABLE_VALUE"


ITEM_IDS_KEY = variable_key(ITEM_IDS)
ELIGIBLE_KEY = variable_key(f"{INDEX}/{base.ELIGIBLE}")


def catalog_values(
  index: base.Index, item_ids: np.ndarray, with_cooccurrence: bool = False
) -> tuple[dict[str, Any], frozenset[str]]:
  """The catalog-sized variables of a FullGraph over `index` and `item_ids`, by object path.

  Args:
    with_cooccurrence: the graph fuses a co-occurrence channel, whose id lookup follows the catalog.

  Returns:
    (values by object path, the paths among them that a graph saved by an earlier build may lack);
    see `base.Index.checkpoint_values`.
  """
  values = {ITEM_IDS: base.string_array(item_ids)}
  values.update({f"{INDEX}/{path}": value for path, value in index.checkpoint_values().items()})
  if with_cooccurrence:
    lookup = cooccurrence_lib.catalog_lookup(item_ids)
    values.update({f"{COOCCURRENCE}/{path}": value for path, value in lookup.items()})
  return values, frozenset(f"{INDEX}/{path}" for path in index.optional_checkpoint_paths())


# Checkpoint prefixes of every catalog-sized variable `catalog_values` replaces.
CATALOG_PREFIXES = (f"{INDEX}/", f"{ITEM_IDS}/", f"{COOCCURRENCE}/{cooccurrence_lib.CATALOG_PREFIX}")


def search_depth(k: int, exclusion_depth: int, num_items: int) -> int:
  """The candidates a full graph asks its index (and co-occurrence channel) for: k plus the exclusion
  depth (0 without exclusions), at most the catalog size.

  Traced into the serving functions, so a refresh may reuse them only for a catalog giving the same depth.
  """
  return min(k + exclusion_depth, num_items)


def check_exclusions(exclusions: str | None, depth: int, query_specs: dict[str, tf.TensorSpec]) -> None:
  if exclusions is not None and exclusions not in query_specs:
    raise ValueError(f"exclusions must name a query feature {sorted(query_specs)}, got {exclusions!r}")
  if exclusions is not None and query_specs[exclusions].dtype != tf.string:
    raise ValueError(f"exclusions feature {exclusions!r} must hold string item ids")
  if depth < 0:
    raise ValueError(f"exclusion_depth must be 0 or more, got {depth}")


def checked_batch(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """The query features, once they all hold one row per request (INVALID_ARGUMENT naming them if not).

  Without it, features of different batch sizes fail deep in a tower (e.g. its attention's einsum),
  with an error that names an internal op rather than the mismatched inputs.
  """
  names = sorted(features)
  if len(names) < 2:
    return dict(features)
  sizes = tf.stack([tf.shape(features[name])[0] for name in names])
  check = tf.debugging.Assert(
    tf.reduce_all(tf.equal(sizes, sizes[0])),
    [
      f"query features must each hold one row per request; the batch sizes (dimension 0) of {', '.join(names)} are",
      sizes,
    ],
    summarize=len(names),
    name="check_batch",
  )
  with tf.control_dependencies([check]):
    return {name: tf.identity(features[name]) for name in names}


def excluded(ids: tf.Tensor, exclusions: tf.Tensor) -> tf.Tensor:
  """bool [B, M]: whether each candidate id [B, M] is among its request's exclusions [B, L].

  Ids are compared by their 63-bit fingerprints (FarmHash): at batch 64 comparing the strings
  themselves measured ~6x slower. Two ids sharing a fingerprint is a ~2^-63 chance per pair.
  L is a behaviour history (tens of ids), so [B, M, L] comparisons cost less than building a hash
  table per request. Padding ("") excludes nothing.
  """
  check = tf.debugging.assert_equal(
    tf.shape(exclusions)[0], tf.shape(ids)[0], message="exclusions must have one row per request"
  )
  with tf.control_dependencies([check]):
    named = tf.not_equal(exclusions, "")
  ids, exclusions = cooccurrence_lib.fingerprints(ids), cooccurrence_lib.fingerprints(exclusions)
  same = tf.logical_and(tf.equal(ids[:, :, tf.newaxis], exclusions[:, tf.newaxis, :]), named[:, tf.newaxis, :])
  return tf.reduce_any(same, axis=2)


def first_kept(k: int, keep: tf.Tensor, *values: tf.Tensor) -> tuple[tf.Tensor, ...]:
  """The first k kept columns of each [B, M] value, in their order, then `keep` of them [B, k].

  Order is kept by ranking columns on their position (kept ones first), so a best-first list stays
  best first; rows with fewer than k kept ones end in columns whose returned `keep` is False.
  """
  positions = tf.cast(tf.range(tf.shape(keep)[1]), tf.float32)[tf.newaxis, :]
  rank = tf.where(keep, -positions, -positions - tf.cast(tf.shape(keep)[1], tf.float32))
  take = tf.math.top_k(rank, k=k, sorted=True).indices
  return tuple(tf.gather(value, take, batch_dims=1) for value in (*values, keep))


def cooccurrence_config(graph: FullGraph) -> dict[str, Any] | None:
  """What a version report records of a graph's co-occurrence channel (None without one)."""
  if graph.cooccurrence is None:
    return None
  return {**graph.cooccurrence.config, "fusion_weight": graph.fusion_weight}


class FullGraph(tf.Module):
  """Joins the two towers and a nearest-neighbour index.

  Args:
    query_tower: maps a dict of query feature tensors to float32 embeddings [B, d].
    item_tower: maps a dict of item feature tensors to float32 embeddings [B, d].
    index: the index over the catalog's item embeddings, row i being `item_ids[i]`.
    item_ids: string [N] ids of the catalog rows.
    k: how many candidates `serving_default` returns.
    query_specs: TensorSpecs of the query features (the signature inputs).
    item_specs: TensorSpecs of the item features.
    exclusions: a string query feature [B, L] of item ids a request must not get back (e.g. the
      items in its history), as TFRS's `query_with_exclusions`; None returns the index's top-k as is.
    exclusion_depth: with `exclusions`, the extra candidates searched beyond k so that k remain
      after removing excluded ones. A request whose top-(k + depth) holds more than `depth` of its
      exclusions gets fewer than k ids (padded as when fewer eligible items exist).
  """

  def __init__(
    self,
    query_tower: Tower,
    item_tower: Tower,
    index: base.Index,
    item_ids: np.ndarray,
    k: int,
    query_specs: dict[str, tf.TensorSpec],
    item_specs: dict[str, tf.TensorSpec],
    exclusions: str | None = None,
    exclusion_depth: int = 0,
    cooccurrence: cooccurrence_lib.CooccurrenceChannel | None = None,
    fusion_weight: float = 0.5,
  ):
    super().__init__(name="full_graph")
    if len(item_ids) != index.num_items:
      raise ValueError(f"{len(item_ids)} item ids for an index of {index.num_items} items")
    base.check_k(k, index.num_items)
    check_exclusions(exclusions, exclusion_depth, query_specs)
    if cooccurrence is not None:
      spec = query_specs.get(cooccurrence.history_feature)
      if spec is None or spec.dtype != tf.string or spec.shape.rank != 2:
        raise ValueError(
          f"the co-occurrence history {cooccurrence.history_feature!r} must be a string [B, L] query feature"
        )
      if not 0 <= fusion_weight <= 1:
        raise ValueError(f"fusion_weight must be in [0, 1], got {fusion_weight}")
    self.query_tower = query_tower
    self.item_tower = item_tower
    self.index = index
    self.item_ids = base.catalog_variable(base.string_array(item_ids), name="item_ids")
    self.k = k
    self.exclusions = exclusions
    self.exclusion_depth = exclusion_depth if exclusions else 0
    self.cooccurrence = cooccurrence
    self.fusion_weight = fusion_weight
    self._query_specs = dict(query_specs)
    self._item_specs = dict(item_specs)

  def retrieve(self, features: dict[str, tf.Tensor], **options: tf.Tensor) -> dict[str, tf.Tensor]:
    """Top-k ids [B, k] (string, "" where fewer eligible items exist) and scores [B, k], best first."""
    features = checked_batch({name: features[name] for name in self._query_specs})
    queries = self.query_tower(features)
    depth = search_depth(self.k, self.exclusion_depth, self.index.num_items)
    fusion_weight = options.pop(FUSION_WEIGHT, None)
    result = self.index.search(queries, depth, **options)
    if self.cooccurrence is not None:
      return self._fuse(features, result, depth, fusion_weight)
    ids = tf.gather(self.item_ids, tf.maximum(result.indices, 0))
    if not self.exclusions:
      ids = tf.where(result.indices >= 0, ids, tf.constant(b"", tf.string))
      return {"ids": ids, "scores": result.scores}
    keep = tf.logical_and(result.indices >= 0, tf.logical_not(excluded(ids, features[self.exclusions])))
    ids, scores, keep = first_kept(self.k, keep, ids, result.scores)
    return {"ids": tf.where(keep, ids, tf.constant(b"", tf.string)), "scores": tf.where(keep, scores, -np.inf)}

  def _fuse(
    self, features: dict[str, tf.Tensor], tower: base.SearchResult, depth: int, fusion_weight: tf.Tensor | None
  ) -> dict[str, tf.Tensor]:
    """The top-k of the towers' and the co-occurrence channel's candidates by rank fusion, exclusions dropped first.

    `fusion_weight` is a request's own towers' share (a scalar in [0, 1]); None takes the graph's.
    """
    if fusion_weight is None:
      fusion_weight = tf.constant(self.fusion_weight, tf.float32)
    else:
      message = "fusion_weight must be in [0, 1]"
      checks = [
        tf.debugging.assert_greater_equal(fusion_weight, 0.0, message=message),
        tf.debugging.assert_less_equal(fusion_weight, 1.0, message=message),
      ]
      with tf.control_dependencies(checks):
        fusion_weight = tf.identity(fusion_weight)
    channel = self.cooccurrence.search(features[self.cooccurrence.history_feature], depth, self.index.eligible)
    lists = []
    for result in (tower, channel):
      keep = result.indices >= 0
      if self.exclusions:
        ids = tf.gather(self.item_ids, tf.maximum(result.indices, 0))
        keep = tf.logical_and(keep, tf.logical_not(excluded(ids, features[self.exclusions])))
      lists.append((result.indices, keep))
    fused = cooccurrence_lib.reciprocal_rank_fusion(*lists[0], *lists[1], fusion_weight, self.k)
    ids = tf.gather(self.item_ids, tf.maximum(fused.indices, 0))
    return {"ids": tf.where(fused.indices >= 0, ids, tf.constant(b"", tf.string)), "scores": fused.scores}

  def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
    """The concrete functions to save as the SavedModel's signatures."""

    @tf.function
    def serve(**features):
      return self.retrieve(features)

    @tf.function
    def encode_query(**features):
      return {"embedding": self.query_tower(features)}

    @tf.function
    def encode_item(**features):
      return {"embedding": self.item_tower(features)}

    signatures = {
      SERVING_DEFAULT: serve.get_concrete_function(**self._query_specs),
      ENCODE_QUERY: encode_query.get_concrete_function(**self._query_specs),
      ENCODE_ITEM: encode_item.get_concrete_function(**self._item_specs),
    }
    option_specs = dict(self.index.search_option_specs())
    if self.cooccurrence is not None:
      option_specs[FUSION_WEIGHT] = tf.TensorSpec([], tf.float32, name=FUSION_WEIGHT)
    if option_specs:
      overlap = set(option_specs) & set(self._query_specs)
      if overlap:
        raise ValueError(f"Search options {sorted(overlap)} clash with query feature names")

      @tf.function
      def search_with_options(**inputs):
        options = {name: inputs.pop(name) for name in option_specs}
        return self.retrieve(inputs, **options)

      signatures[SEARCH_WITH_OPTIONS] = search_with_options.get_concrete_function(**self._query_specs, **option_specs)
    return signatures

  def save(self, path: str) -> None:
    """Writes the SavedModel to path (which must not exist yet) with every signature."""
    options = tf.saved_model.SaveOptions(namespace_whitelist=self.index.save_namespaces() or None)
    with without_keras_layer_notices():
      tf.saved_model.save(self, path, signatures=self.signatures(), options=options)


# tf-keras's warning, once per tower layer its own code never called (layers the towers call through
# their own functions), that it writes the layer without the metadata `tf.keras.models.load_model` needs.
# Exports are loaded with `tf.saved_model.load` and served through their signatures, which are traced.
_UNBUILT_KERAS_LAYER = "Skipping full serialization of TF-Keras layer"


class _UnbuiltKerasLayerFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_UNBUILT_KERAS_LAYER)


@contextlib.contextmanager
def without_keras_layer_notices() -> Iterator[None]:
  """Drops tf-keras's "Skipping full serialization" warnings while a graph is saved (see above)."""
  tensorflow_logger = logging.getLogger("tensorflow")
  notices = _UnbuiltKerasLayerFilter()
  tensorflow_logger.addFilter(notices)
  try:
    yield
  finally:
    tensorflow_logger.removeFilter(notices)
