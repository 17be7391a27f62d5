"""Checks an index, or a whole exported version, against exact search over the same embeddings."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from engine import base, full_graph, search_ops
from models.data import schema, sequences


def index_recall(index: base.Index, queries: np.ndarray, embeddings: np.ndarray, eligible: np.ndarray, k: int) -> float:
  """recall@k of an in-process index against exact search over the eligible items."""
  found = tf.function(lambda q: index.search(q, k).indices)(tf.constant(queries)).numpy()
  return search_ops.recall_at_k(found, search_ops.exact_top_k_numpy(queries, embeddings, k, eligible=eligible))


def saved_model_recall(
  version_path: str, table: sequences.ItemTable, queries: dict[str, np.ndarray], batch_size: int = 8192
) -> float:
  """recall@k of a version's `serving_default` against exact top-k computed from the same SavedModel.

  The catalog is embedded with the SavedModel's `encode_item` signature and the queries with
  `encode_query`; the exact top-k over active ads is compared with what `serving_default` (towers
  plus index, as served) returns. Load the index's custom ops first
  (`engine.base.backend(name).load_ops()`).
  """
  loaded = tf.saved_model.load(version_path)
  encode_item = loaded.signatures[full_graph.ENCODE_ITEM]
  ids, embeddings, eligible = [], [], []
  for _, features in sequences.iterate_catalog(table, batch_size):
    ids.append(features[schema.AD_ID])
    eligible.append(features[schema.STATUS] == "active")
    tensors = {name: tf.constant(features[name]) for name in schema.ITEM_FEATURE_NAMES}
    embeddings.append(encode_item(**tensors)["embedding"].numpy())
  ids, embeddings, eligible = np.concatenate(ids), np.concatenate(embeddings), np.concatenate(eligible)

  tensors = {name: tf.constant(values) for name, values in queries.items()}
  served = base.decoded_strings(loaded.signatures[full_graph.SERVING_DEFAULT](**tensors)["ids"])
  query_embeddings = loaded.signatures[full_graph.ENCODE_QUERY](**tensors)["embedding"].numpy()
  row_of = {ad_id: row for row, ad_id in enumerate(ids)}
  served_rows = np.vectorize(lambda ad_id: row_of.get(ad_id, -1), otypes=[np.int64])(served)
  exact = search_ops.exact_top_k_numpy(query_embeddings, embeddings, served.shape[1], eligible=eligible)
  return search_ops.recall_at_k(served_rows, exact)
