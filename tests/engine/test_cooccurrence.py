"""The co-occurrence channel and its rank fusion with the towers, checked against NumPy references."""

import numpy as np
import pytest
import tensorflow as tf

from engine import base, cooccurrence, full_graph
from tests.engine import tower_testlib

NUM_ITEMS, DIM, K, NEIGHBOURS, HISTORY, DECAY = 200, 8, 10, 6, 4, 0.5
QUERY_SPECS, ITEM_SPECS = tower_testlib.QUERY_SPECS, tower_testlib.ITEM_SPECS
IDS = tower_testlib.item_ids(NUM_ITEMS)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  # Neighbours of the first 150 items, some naming ids outside the catalog, padded rows too. Weights
  # are multiples of 1/8, and recency weights powers of 1/2, so every sum is exact in float32.
  keys = IDS[:150]
  neighbour_ids = np.asarray([[f"ad{j}" for j in rng.choice(NUM_ITEMS + 20, NEIGHBOURS, replace=False)] for _ in keys])
  weights = rng.integers(1, 9, size=neighbour_ids.shape) / 8.0
  neighbour_ids[::7, -2:] = ""
  eligible = rng.random(NUM_ITEMS) > 0.15
  history = np.full([16, 6], "", dtype=object)
  for q in range(len(history)):
    history[q, : q % 7] = IDS[rng.choice(NUM_ITEMS, q % 7, replace=False)]  # Some rows are empty.
  history[3, 1] = "not-in-any-table"
  table = cooccurrence.NeighbourTable.from_ids(keys, neighbour_ids, weights)
  return table, (keys, neighbour_ids, weights), eligible, history


def _reference(raw, eligible, history):
  """[Q, N] channel scores by the rule in `CooccurrenceChannel`: -inf for items without a vote."""
  keys, neighbour_ids, weights = raw
  where = {key: i for i, key in enumerate(keys)}
  row_of = {ad_id: i for i, ad_id in enumerate(IDS)}
  scores = np.zeros([len(history), NUM_ITEMS])
  for q, recent in enumerate(history[:, :HISTORY]):
    for t, item in enumerate(recent):
      if item in where:
        for neighbour, weight in zip(neighbour_ids[where[item]], weights[where[item]]):
          if neighbour in row_of and eligible[row_of[neighbour]]:
            scores[q, row_of[neighbour]] += DECAY**t * weight
  return np.where(scores > 0, scores, -np.inf)


def _channel(table):
  return cooccurrence.CooccurrenceChannel(table, IDS, "history", history=HISTORY, decay=DECAY)


@pytest.mark.parametrize("depth", [5, 40])
def test_channel_search_sums_recent_votes_over_eligible_catalog_items(setup, depth):
  table, raw, eligible, history = setup
  reference = _reference(raw, eligible, history)
  result = _channel(table).search(tf.constant(history), depth, tf.constant(eligible))
  rows, scores = result.indices.numpy(), result.scores.numpy()
  assert rows.shape == scores.shape == (len(history), depth)
  for q in range(len(history)):
    expected = np.sort(reference[q])[::-1][:depth]
    np.testing.assert_allclose(scores[q], expected, rtol=1e-6)  # Best first, as many as voted for.
    found = rows[q][np.isfinite(scores[q])]
    assert len(set(found)) == len(found) and np.all(rows[q][~np.isfinite(scores[q])] == -1)
    np.testing.assert_allclose(reference[q, found], scores[q][: len(found)], rtol=1e-6)
  assert np.all(rows[0] == -1)  # An empty history votes for nothing.


def test_a_history_with_no_columns_votes_for_nothing(setup):
  # What a request with `"hist_ids": []` becomes: [B, 0], a shape the signature accepts.
  table, _, eligible, _ = setup
  result = _channel(table).search(tf.zeros([3, 0], tf.string), 5, tf.constant(eligible))
  assert result.indices.shape == (3, 5)
  assert np.all(result.indices.numpy() == -1) and np.all(np.isneginf(result.scores.numpy()))


def test_catalog_lookup_follows_a_reordered_catalog(setup):
  table, raw, eligible, history = setup
  order = np.random.default_rng(1).permutation(NUM_ITEMS)
  channel = cooccurrence.CooccurrenceChannel(table, IDS[order], "history", history=HISTORY, decay=DECAY)
  result = channel.search(tf.constant(history), 20, tf.constant(eligible[order]))
  expected = _channel(table).search(tf.constant(history), 20, tf.constant(eligible))
  np.testing.assert_allclose(result.scores.numpy(), expected.scores.numpy(), rtol=1e-6)
  # The same ids come back under their new rows (equal scores tie in catalog order: compare as sets).
  moved = np.where(result.indices.numpy() >= 0, order[np.maximum(result.indices.numpy(), 0)], -1)
  for got, want in zip(moved, expected.indices.numpy()):
    assert set(got) == set(want)


def _fusion_reference(first, second, weight, k):
  """NumPy RRF over two lists of rows (-1 skipped): [(row, score)] best first."""
  fused = {}
  for rows, share in ((first, weight), (second, 1 - weight)):
    kept = [r for r in rows if r >= 0]
    for rank, row in enumerate(kept, start=1):
      fused[row] = fused.get(row, 0.0) + share / (cooccurrence.RRF_CONSTANT + rank)
  return sorted(fused.items(), key=lambda item: -item[1])[:k]


def test_reciprocal_rank_fusion_matches_reference():
  rng = np.random.default_rng(2)
  first = np.stack([rng.choice(30, 8, replace=False) for _ in range(5)])
  second = np.stack([rng.choice(30, 12, replace=False) for _ in range(5)])
  second[1, 6:] = -1
  first[2, :] = -1
  for weight in (0.0, 0.3, 1.0):
    result = cooccurrence.reciprocal_rank_fusion(
      tf.constant(first, tf.int32),
      tf.constant(first >= 0),
      tf.constant(second, tf.int32),
      tf.constant(second >= 0),
      weight,
      6,
    )
    for q in range(len(first)):
      expected = _fusion_reference(first[q], second[q], weight, 6)
      scores = result.scores.numpy()[q]
      np.testing.assert_allclose(scores[: len(expected)], [s for _, s in expected], rtol=1e-6)
      by_row = dict(_fusion_reference(first[q], second[q], weight, 100))
      for row, score in zip(result.indices.numpy()[q], scores):
        assert (row == -1) == (not np.isfinite(score))
        if row >= 0:
          assert by_row[row] == pytest.approx(score, rel=1e-6)


def _graph(setup, **kwargs):
  table, _, eligible, history = setup
  rng = np.random.default_rng(3)
  queries = rng.normal(size=[len(history), DIM]).astype(np.float32)
  items = rng.normal(size=[NUM_ITEMS, DIM]).astype(np.float32)
  graph = tower_testlib.table_graph(queries, items, eligible, K, cooccurrence=_channel(table), **kwargs)
  return graph, {"query": tf.range(len(history), dtype=tf.int32), "history": tf.constant(history)}


def test_full_graph_fuses_both_lists_and_saves(setup, tmp_path):
  table, raw, eligible, history = setup
  graph, request = _graph(setup, fusion_weight=0.4, exclusions="history", exclusion_depth=6)
  served = graph.retrieve(request)
  depth = K + 6
  tower = graph.index.search(graph.query_tower(request), depth)
  channel = graph.cooccurrence.search(request["history"], depth, graph.index.eligible)
  named = {q: set(history[q]) - {""} for q in range(len(history))}
  for q in range(len(history)):
    lists = [
      [r if r >= 0 and IDS[r] not in named[q] else -1 for r in result.indices.numpy()[q]] for result in (tower, channel)
    ]
    expected = _fusion_reference(*lists, 0.4, K)
    ids = served["ids"].numpy()[q].astype(str)
    scores = served["scores"].numpy()[q]
    np.testing.assert_allclose(scores[: len(expected)], [s for _, s in expected], rtol=1e-6)
    by_row = dict(_fusion_reference(*lists, 0.4, 1000))
    for ad_id, score in zip(ids[: len(expected)], scores):
      assert ad_id not in named[q] and by_row[int(ad_id[2:])] == pytest.approx(score, rel=1e-6)
  path = str(tmp_path / "graph")
  graph.save(path)
  loaded = tf.saved_model.load(path).signatures["serving_default"](**request)
  np.testing.assert_array_equal(loaded["ids"].numpy(), served["ids"].numpy())
  np.testing.assert_allclose(loaded["scores"].numpy(), served["scores"].numpy(), rtol=1e-6)
  assert full_graph.cooccurrence_config(graph) == {
    "history_feature": "history",
    "history": HISTORY,
    "decay": DECAY,
    "neighbours": NEIGHBOURS,
    "fusion_weight": 0.4,
  }


def test_fusion_weight_is_a_per_request_option(setup, tmp_path):
  graph, request = _graph(setup, fusion_weight=0.4)
  path = str(tmp_path / "graph")
  graph.save(path)
  signatures = tf.saved_model.load(path).signatures
  search = signatures[full_graph.SEARCH_WITH_OPTIONS]
  same = search(**request, fusion_weight=tf.constant(0.4))
  np.testing.assert_array_equal(same["ids"].numpy(), signatures["serving_default"](**request)["ids"].numpy())
  towers_only = search(**request, fusion_weight=tf.constant(1.0))
  expected = _graph(setup, fusion_weight=1.0)[0].retrieve(request)
  np.testing.assert_allclose(towers_only["scores"].numpy(), expected["scores"].numpy(), rtol=1e-6)
  with pytest.raises(tf.errors.InvalidArgumentError, match="fusion_weight must be in"):
    search(**request, fusion_weight=tf.constant(1.5))


def test_bad_arguments_are_refused(setup):
  table, raw, *_ = setup
  with pytest.raises(ValueError, match="fusion_weight"):
    _graph(setup, fusion_weight=1.5)
  with pytest.raises(ValueError, match="history >= 1"):
    cooccurrence.CooccurrenceChannel(table, IDS, "history", history=0, decay=0.5)
  with pytest.raises(ValueError, match="unique"):
    cooccurrence.NeighbourTable.from_ids(np.asarray(["a", "a"]), np.asarray([["b"], ["c"]]), np.ones([2, 1]))
  with pytest.raises(ValueError, match=r"\[V, K\]"):
    cooccurrence.NeighbourTable.from_ids(np.asarray(["a"]), np.asarray(["b"]), np.ones([1]))
  specs = {**QUERY_SPECS, "history": tf.TensorSpec([None], tf.string)}
  with pytest.raises(ValueError, match="string \\[B, L\\] query feature"):
    full_graph.FullGraph(
      tower_testlib.TableTower(np.zeros([1, DIM], np.float32), "query"),
      tower_testlib.TableTower(np.zeros([NUM_ITEMS, DIM], np.float32), "row"),
      base.build_index("brute_force", np.zeros([NUM_ITEMS, DIM], np.float32), k=K),
      IDS,
      K,
      specs,
      ITEM_SPECS,
      cooccurrence=_channel(table),
    )
