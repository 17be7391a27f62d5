"""Exclusions: a graph never returns the ids a request names (its history), yet still fills k."""

import numpy as np
import pytest
import tensorflow as tf

from engine import base, channels
from tests import topk_testlib
from tests.engine import tower_testlib

NUM_ITEMS, DIM, K, DEPTH, HISTORY = 300, 8, 10, 6, 8
QUERY_SPECS, ITEM_SPECS = tower_testlib.QUERY_SPECS, tower_testlib.ITEM_SPECS
IDS = tower_testlib.item_ids(NUM_ITEMS)


@pytest.fixture(scope="module")
def catalog():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=[12, DIM]).astype(np.float32)
  items = rng.normal(size=[NUM_ITEMS, DIM]).astype(np.float32)
  eligible = rng.random(NUM_ITEMS) > 0.1
  scores = topk_testlib.reference_scores(queries, items, eligible)
  order = np.argsort(-scores, axis=1, kind="stable")
  # Each request's history: some of its own best items (which must not come back), an item it would
  # never get, and padding.
  history = np.full([len(queries), HISTORY], "", dtype=object)
  for q in range(len(queries)):
    own = order[q, [0, 2, 3, 7]] if q % 2 else order[q, [1]]
    history[q, : len(own)] = IDS[own]
    history[q, len(own)] = IDS[order[q, -1]]
  return queries, items, eligible, scores, order, history


def _graph(catalog, exclusions="history", depth=DEPTH):
  queries, items, eligible, *_ = catalog
  return tower_testlib.table_graph(queries, items, eligible, K, exclusions=exclusions, exclusion_depth=depth)


def _rows(ids):
  return np.asarray([[int(x[2:]) if x else -1 for x in row] for row in ids.astype(str)])


def _expected(catalog, depth):
  """NumPy reference [Q, K] (-1 past the end): the first K of each request's top-(K + depth) that its
  history does not name, and how many there are per request."""
  _, _, _, _, order, history = catalog
  expected = np.full([len(order), K], -1)
  counts = []
  for q in range(len(order)):
    named = {int(x[2:]) for x in history[q] if x}
    kept = [r for r in order[q, : K + depth] if r not in named][:K]
    expected[q, : len(kept)] = kept
    counts.append(len(kept))
  return expected, np.asarray(counts)


def _assert_excluded(ids, history):
  for served, named in zip(ids.astype(str), history):
    assert not {x for x in named if x} & set(served)


def _features(catalog):
  queries, *_, history = catalog
  return {"query": tf.range(len(queries)), "history": tf.constant(history.astype(bytes))}


def test_excluded_ids_never_come_back_and_the_rest_fill_k_in_score_order(catalog):
  scores, history = catalog[3], catalog[5]
  out = _graph(catalog).retrieve(_features(catalog))
  _assert_excluded(out["ids"].numpy(), history)
  expected, counts = _expected(catalog, DEPTH)
  assert (counts == K).all()
  got = _rows(out["ids"].numpy())
  topk_testlib.assert_top_k_agree(got, expected, scores)
  served_scores = np.take_along_axis(scores, got, axis=1)
  np.testing.assert_allclose(out["scores"].numpy(), served_scores, rtol=0, atol=topk_testlib.SCORE_ATOL)


def test_more_exclusions_in_the_top_than_the_depth_leaves_fewer_than_k(catalog):
  scores, history = catalog[3], catalog[5]
  out = _graph(catalog, depth=2).retrieve(_features(catalog))
  _assert_excluded(out["ids"].numpy(), history)
  expected, counts = _expected(catalog, 2)
  # Odd requests name 4 of their top 10: with 2 spare candidates they get 8 ids, then padding.
  assert counts.min() == K - 2
  got = _rows(out["ids"].numpy())
  topk_testlib.assert_top_k_agree(got, expected, scores)
  assert np.isneginf(out["scores"].numpy()[got < 0]).all() and (out["ids"].numpy()[got < 0] == b"").all()


def test_without_exclusions_the_graph_returns_the_index_top_k(catalog):
  scores, order = catalog[3], catalog[4]
  out = _graph(catalog, exclusions=None).retrieve(_features(catalog))
  topk_testlib.assert_top_k_agree(_rows(out["ids"].numpy()), order[:, :K], scores)


def test_saved_graph_excludes_through_its_signature(catalog, tmp_path):
  _graph(catalog).save(str(tmp_path / "graph"))
  served = tf.saved_model.load(str(tmp_path / "graph")).signatures["serving_default"](**_features(catalog))
  _assert_excluded(served["ids"].numpy(), catalog[5])
  topk_testlib.assert_top_k_agree(_rows(served["ids"].numpy()), _expected(catalog, DEPTH)[0], catalog[3])


@pytest.mark.parametrize(
  "exclusions, depth, message",
  [("missing", 4, "must name a query feature"), ("query", 4, "string item ids"), ("history", -1, "0 or more")],
)
def test_bad_exclusions_are_refused(catalog, exclusions, depth, message):
  with pytest.raises(ValueError, match=message):
    _graph(catalog, exclusions=exclusions, depth=depth)


def test_channel_graph_drops_excluded_candidates_before_the_merge(catalog):
  queries, items, eligible, scores, _, history = catalog
  index = base.build_index("brute_force", items, k=K, eligible=eligible)
  channel = channels.Channel(
    "only",
    tower_testlib.TableTower(queries, "query"),
    tower_testlib.TableTower(items, "row"),
    index,
    items,
    depth=K + DEPTH,
    click=channels.Calibration(1.0, 0.0),
  )
  defaults = channels.Defaults(weights=(1.0,), depths=(K + DEPTH,))
  graph = channels.ChannelGraph([channel], IDS, K, defaults, QUERY_SPECS, ITEM_SPECS, exclusions="history")
  out = graph.retrieve(_features(catalog), channels.option_inputs(defaults.to_json()))
  _assert_excluded(out["ids"].numpy(), history)
  # One channel with a monotone calibration: the merge keeps the channel's order.
  topk_testlib.assert_top_k_agree(_rows(out["ids"].numpy()), _expected(catalog, DEPTH)[0], scores)


def test_exclusions_of_another_batch_size_are_an_invalid_argument(catalog):
  features = _features(catalog)
  features["history"] = features["history"][:3]
  with pytest.raises(tf.errors.InvalidArgumentError, match="one row per request"):
    _graph(catalog).retrieve(features)
