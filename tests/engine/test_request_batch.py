"""A request's query features must each hold one row per request, or the call is INVALID_ARGUMENT naming them."""

import numpy as np
import pytest
import tensorflow as tf

from engine import base, channels, full_graph
from tests.engine import tower_testlib

NUM_ITEMS, DIM, K = 50, 4, 5
# The error names every query feature and its batch size, in name order.
MESSAGE = r"one row per request; the batch sizes \(dimension 0\) of history, query are\] \[3 2\]"


@pytest.fixture(scope="module")
def catalog():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=[4, DIM]).astype(np.float32)
  items = rng.normal(size=[NUM_ITEMS, DIM]).astype(np.float32)
  return queries, items, np.ones(NUM_ITEMS, bool)


def _features(history_rows: int) -> dict[str, tf.Tensor]:
  return {"query": tf.range(2), "history": tf.constant([[b"ad1", b""]] * history_rows)}


def test_full_graph_names_features_of_different_batch_sizes(catalog):
  # Without exclusions or co-occurrence the history reaches no op, so nothing else would notice.
  serve = tower_testlib.table_graph(*catalog, K).signatures()[full_graph.SERVING_DEFAULT]
  assert serve(**_features(2))["ids"].shape == (2, K)
  with pytest.raises(tf.errors.InvalidArgumentError, match=MESSAGE):
    serve(**_features(3))


def test_channel_graph_names_features_of_different_batch_sizes(catalog):
  queries, items, eligible = catalog
  channel = channels.Channel(
    "only",
    tower_testlib.TableTower(queries, "query"),
    tower_testlib.TableTower(items, "row"),
    base.build_index("brute_force", items, k=K, eligible=eligible),
    items,
    depth=K,
    click=channels.Calibration(1.0, 0.0),
  )
  graph = channels.ChannelGraph(
    [channel],
    tower_testlib.item_ids(NUM_ITEMS),
    K,
    channels.Defaults(weights=(1.0,), depths=(K,)),
    tower_testlib.QUERY_SPECS,
    tower_testlib.ITEM_SPECS,
  )
  serve = graph.signatures()[full_graph.SERVING_DEFAULT]
  assert serve(**_features(2))["ids"].shape == (2, K)
  with pytest.raises(tf.errors.InvalidArgumentError, match=MESSAGE):
    serve(**_features(3))
