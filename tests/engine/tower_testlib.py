"""Towers whose output a test knows exactly, for graphs checked against NumPy."""

import numpy as np
import tensorflow as tf

from engine import base, full_graph


class TableTower(tf.Module):
  """Looks a row's embedding up in a fixed table: feature `feature` holds the rows."""

  def __init__(self, table: np.ndarray, feature: str):
    super().__init__()
    self.table = tf.Variable(table, trainable=False)
    self.feature = feature

  def __call__(self, features):
    return tf.gather(self.table, features[self.feature])


# A graph over TableTowers: the query row, the request's history of item ids, and the item row.
QUERY_SPECS = {
  "query": tf.TensorSpec([None], tf.int32, name="query"),
  "history": tf.TensorSpec([None, None], tf.string, name="history"),
}
ITEM_SPECS = {"row": tf.TensorSpec([None], tf.int32, name="row")}


def item_ids(count: int) -> np.ndarray:
  """The ids "ad0", "ad1", ... of a test catalog's rows."""
  return np.asarray([f"ad{i}" for i in range(count)], dtype=object)


def table_graph(queries: np.ndarray, items: np.ndarray, eligible: np.ndarray, k: int, **options):
  """A brute-force FullGraph over TableTowers of `queries` and `items` (ids from `item_ids`), with FullGraph `options`."""
  return full_graph.FullGraph(
    TableTower(queries, "query"),
    TableTower(items, "row"),
    base.build_index("brute_force", items, k=k, eligible=eligible),
    item_ids(len(items)),
    k,
    QUERY_SPECS,
    ITEM_SPECS,
    **options,
  )
