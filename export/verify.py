"""Checks an index, or a whole exported version, against exact search over the same embeddings."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from engine import base, full_graph
from models.data import schema, sequences


def exact_top_k(queries: np.ndarray, embeddings: np.ndarray, eligible: np.ndarray, k: int,
                block: int = 64) -> np.ndarray:
  """Rows [n, k] of the k eligible items with the highest dot product (unordered within the k)."""
  rows = []
  for start in range(0, len(queries), block):  # Blocks keep the [block, N] score matrix small.
    scores = queries[start:start + block] @ embeddings.T
    scores[:, ~eligible] = -np.inf
    rows.append(np.argpartition(-scores, k - 1, axis=1)[:, :k])
  return np.concatenate(rows)


def mean_overlap(expected: np.ndarray, found: np.ndarray) -> float:
  """Mean share of each row of `expected` [n, k] that the same row of `found` contains."""
  k = expected.shape[1]
  return float(np.mean([len(np.intersect1d(e, f)) / k for e, f in zip(expected, found)]))


def index_recall(index: base.Index, queries: np.ndarray, embeddings: np.ndarray, eligible: np.ndarray,
                 k: int) -> float:
  """recall@k of an in-process index against exact search over the eligible items."""
  found = tf.function(lambda q: index.search(q, k).indices)(tf.constant(queries)).numpy()
  return mean_overlap(exact_top_k(queries, embeddings, eligible, k), found)


def saved_model_recall(version_path: str, table: sequences.ItemTable,
                       queries: dict[str, np.ndarray], batch_size: int = 8192) -> float:
  """recall@k of a version's `serving_default` against exact top-k computed from the same SavedModel.

  The catalog is embedded with the SavedModel's `encode_item` signature and the queries with
  `encode_query`; the exact top-k over active ads is compared with what `serving_default` (towers
  plus index, as served) returns. Load ScaNN's ops (`import scann`) first for a ScaNN version.
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
  served = loaded.signatures[full_graph.SERVING_DEFAULT](**tensors)["ids"].numpy().astype(str)
  query_embeddings = loaded.signatures[full_graph.ENCODE_QUERY](**tensors)["embedding"].numpy()
  exact = ids[exact_top_k(query_embeddings, embeddings, eligible, served.shape[1])]
  return mean_overlap(exact, served)
