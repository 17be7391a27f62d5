"""ChannelGraph: per-channel recall, quota-free merge, relevance floor, masks and knobs, against NumPy."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from engine import base, channels, full_graph
from tests.engine import tower_testlib

NUM_ITEMS, DIM, K = 400, 8, 20
QUERY_SPECS = {"query": tf.TensorSpec([None], tf.int32, name="query")}
ITEM_SPECS = {"row": tf.TensorSpec([None], tf.int32, name="row")}


def _unit(rng, n):
  x = rng.normal(size=[n, DIM]).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  eligible = rng.random(NUM_ITEMS) > 0.1  # Paused ads.
  queries = {name: _unit(rng, 16) for name in ("semantic", "efficiency")}
  items = {name: _unit(rng, NUM_ITEMS) for name in ("semantic", "efficiency")}
  calibrations = {"semantic": channels.Calibration(6.0, -3.0), "efficiency": channels.Calibration(4.0, -4.0)}
  built = []
  for name in ("semantic", "efficiency"):
    index = base.build_index("brute_force", items[name], k=40, eligible=eligible)
    relevance = channels.Calibration(10.0, -2.0) if name == "semantic" else None
    built.append(
      channels.Channel(
        name,
        tower_testlib.TableTower(queries[name], "query"),
        tower_testlib.TableTower(items[name], "row"),
        index,
        items[name],
        depth=40,
        click=calibrations[name],
        relevance=relevance,
      )
    )
  defaults = channels.Defaults(weights=(1.0, 1.0), depths=(40, 40))
  ids = np.asarray([f"ad{i}" for i in range(NUM_ITEMS)], dtype=object)
  graph = channels.ChannelGraph(built, ids, K, defaults, QUERY_SPECS, ITEM_SPECS)
  return graph, queries, items, calibrations, eligible


def _options(graph, **overrides):
  """The graph's default knobs with `overrides` (named as `channels.Defaults` fields)."""
  return channels.option_inputs({**graph.defaults.to_json(), **overrides})


def _rows(ids):
  return np.asarray([[int(x[2:]) if x else -1 for x in row] for row in ids.astype(str)])


def _pooled(graph, queries, items, calibrations, weights):
  """NumPy reference: the weighted mean of each channel's log click probability, for every item."""
  total = 0.0
  for w, name in zip(weights, ("semantic", "efficiency")):
    scores = queries[name] @ items[name].T
    c = calibrations[name]
    total = total + w * -np.log1p(np.exp(-(c.slope * scores + c.intercept)))
  return total / sum(weights)


def test_one_channel_alone_is_its_own_top_k(setup):
  graph, queries, items, _, eligible = setup
  features = {"query": tf.range(16)}
  for c, name in enumerate(("semantic", "efficiency")):
    weights = [1.0 if i == c else 0.0 for i in range(2)]
    depths = [40 if i == c else 0 for i in range(2)]
    out = graph.retrieve(features, _options(graph, weights=weights, depths=depths))
    scores = np.where(eligible, queries[name] @ items[name].T, -np.inf)
    expected = np.argsort(-scores, axis=1)[:, :K]
    got = _rows(out["ids"].numpy())
    # Same set, up to float ties (none expected on random unit vectors).
    assert all(set(g) == set(e) for g, e in zip(got, expected))
    assert set(out["channels"].numpy().ravel().astype(str)) <= {name, "semantic+efficiency"}


def test_merge_ranks_the_union_by_one_pooled_score_without_duplicates(setup):
  graph, queries, items, calibrations, eligible = setup
  out = graph.retrieve({"query": tf.range(16)}, _options(graph))
  got = _rows(out["ids"].numpy())
  pooled = _pooled(graph, queries, items, calibrations, (1.0, 1.0))
  labels = out["channels"].numpy().astype(str)
  for q in range(16):
    assert len(set(got[q])) == K and eligible[got[q]].all()
    found = {}
    for name in ("semantic", "efficiency"):
      scores = np.where(eligible, queries[name][q] @ items[name].T, -np.inf)
      found[name] = set(np.argsort(-scores)[:40].tolist())
    union = np.asarray(sorted(found["semantic"] | found["efficiency"]))
    expected = union[np.argsort(-pooled[q, union])[:K]]
    assert set(got[q]) == set(expected.tolist())
    np.testing.assert_allclose(out["scores"].numpy()[q], np.sort(pooled[q, expected])[::-1], rtol=1e-4, atol=1e-5)
    # Each id names every channel whose candidates held it, in channel order.
    sources = ["+".join(name for name in ("semantic", "efficiency") if row in found[name]) for row in got[q]]
    assert labels[q].tolist() == sources
  assert len(set(labels.ravel())) > 1


def test_min_relevance_drops_candidates_below_it(setup):
  graph, queries, items, _, _ = setup
  out = graph.retrieve({"query": tf.range(16)}, _options(graph, min_relevance=0.995))
  rows = _rows(out["ids"].numpy())
  relevance = 1 / (1 + np.exp(-(10.0 * (queries["semantic"] @ items["semantic"].T) - 2.0)))
  kept = rows >= 0
  assert kept.any() and not kept.all()  # Some lists end early: too few candidates are relevant enough.
  assert (np.take_along_axis(relevance, np.maximum(rows, 0), axis=1)[kept] >= 0.995 - 1e-5).all()
  assert (out["ids"].numpy()[~kept] == b"").all()


@pytest.mark.parametrize(
  "override",
  [
    {"depths": [41, 40]},
    {"depths": [0, 0]},
    {"weights": [-1.0, 1.0]},
    {"weights": [0.0, 0.0]},
  ],
)
def test_bad_knobs_are_invalid_arguments(setup, override):
  graph = setup[0]
  with pytest.raises(tf.errors.InvalidArgumentError):
    graph.retrieve({"query": tf.range(2)}, _options(graph, **override))


# One bad value for each rule of `engine.knob_rules`: (knob, value, the diversity method whose requests
# use the knob, what the refusal says).
_BAD_KNOBS = [
  ("weights", [np.inf, 1.0], "none", "channel weights must be finite numbers >= 0"),
  ("weights", [np.nan, 1.0], "none", "channel weights must be finite numbers >= 0"),
  ("weights", [-1.0, 1.0], "none", "channel weights must be finite numbers >= 0"),
  ("weights", [1e39, 1.0], "none", "channel weights must be finite numbers >= 0"),  # inf as float32.
  ("weights", [0.0, 0.0], "none", "some channel weight must be > 0"),
  ("weights", [1e-40, 0.0], "none", "some channel weight must be > 0"),  # A subnormal: TF flushes it to 0.
  ("depths", [-1, 40], "none", "channel depths must be 0 or more"),
  ("depths", [0, 0], "none", "channel depths must ask at least one channel"),
  ("min_relevance", 1.5, "none", r"min_relevance must be in \[0, 1\]"),
  ("min_relevance", -1.0, "none", r"min_relevance must be in \[0, 1\]"),
  ("min_relevance", np.nan, "none", r"min_relevance must be in \[0, 1\]"),
  ("window", 0, "ssd", "diversity window must be >= 1"),
  ("window", -2, "dpp", "diversity window must be >= 1"),
  ("gamma", np.inf, "ssd", "ssd gamma must be a finite number >= 0"),
  ("gamma", np.nan, "ssd", "ssd gamma must be a finite number >= 0"),
  ("gamma", -0.5, "ssd", "ssd gamma must be a finite number >= 0"),
  ("theta", 1.0, "dpp", r"dpp theta must be in \[0, 1\)"),
  ("theta", np.nan, "dpp", r"dpp theta must be in \[0, 1\)"),
]


@pytest.mark.parametrize("knob, value, method, message", _BAD_KNOBS)
def test_export_defaults_and_requests_refuse_the_same_knobs(setup, knob, value, method, message):
  """fgr-export once published defaults (an inf weight, all-zero weights) that every request then failed on."""
  graph = setup[0]
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(graph.defaults, diversity=method, **{knob: value})
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    graph.retrieve({"query": tf.range(2)}, _options(graph, diversity=method, **{knob: value}))


def test_a_default_knob_must_suit_every_method_a_request_may_switch_to(setup):
  # A request ignores the knobs its method does not use; fgr-eval's ssd and dpp variants keep the
  # default knobs and switch the method, so a default is held to every rule.
  graph = setup[0]
  out = graph.retrieve({"query": tf.range(2)}, _options(graph, diversity="none", gamma=np.inf, theta=1.0))
  assert (out["ids"].numpy() != b"").all()
  with pytest.raises(ValueError, match="ssd gamma"):
    dataclasses.replace(graph.defaults, diversity="none", gamma=np.inf)


def test_huge_finite_weights_pool_as_their_ratio(setup):
  """Weights of 3e38 summed to inf, and inf / inf = NaN dropped every candidate."""
  graph = setup[0]
  features = {"query": tf.range(16)}
  for huge, plain in (([3e38, 3e38], [1.0, 1.0]), ([3e38, 1.5e38], [2.0, 1.0])):
    got = graph.retrieve(features, _options(graph, weights=huge))
    expected = graph.retrieve(features, _options(graph, weights=plain))
    assert (got["ids"].numpy() != b"").all()
    np.testing.assert_array_equal(got["ids"].numpy(), expected["ids"].numpy())
    # Both are scaled to a largest weight of 1 before pooling; float32 rounding may differ in the last bits.
    np.testing.assert_allclose(got["scores"].numpy(), expected["scores"].numpy(), rtol=1e-6)


def test_defaults_deeper_than_a_channel_or_a_k_beyond_its_depths_are_refused(setup):
  graph = setup[0]
  ids = tower_testlib.item_ids(NUM_ITEMS)
  deeper = dataclasses.replace(graph.defaults, depths=(41, 40))
  with pytest.raises(ValueError, match=r"at most the depth each channel was exported with, \[40, 40\]; got \(41, 40\)"):
    channels.ChannelGraph(graph.channels, ids, K, deeper, QUERY_SPECS, ITEM_SPECS)
  message = r"k must be in \[1, 80\] \(the sum of the channels' depths \[40, 40\]\), got 81"
  with pytest.raises(ValueError, match=message):
    channels.ChannelGraph(graph.channels, ids, 81, graph.defaults, QUERY_SPECS, ITEM_SPECS)


def test_more_channels_than_the_label_table_holds_are_refused(setup):
  graph = setup[0]
  too_many = [graph.channels[0]] * (channels.MAX_CHANNELS + 1)
  with pytest.raises(ValueError, match="1 to 8 channels"):
    channels.ChannelGraph(
      too_many, np.asarray(["x"] * NUM_ITEMS, dtype=object), K, graph.defaults, QUERY_SPECS, ITEM_SPECS
    )


def test_saved_graph_answers_like_the_module(setup, tmp_path):
  graph = setup[0]
  graph.save(str(tmp_path / "m"))
  loaded = tf.saved_model.load(str(tmp_path / "m"))
  expected = graph.retrieve({"query": tf.range(16)}, _options(graph))
  got = loaded.signatures[full_graph.SERVING_DEFAULT](query=tf.range(16))
  np.testing.assert_array_equal(got["ids"].numpy(), expected["ids"].numpy())
  np.testing.assert_array_equal(got["channels"].numpy(), expected["channels"].numpy())
  with_options = loaded.signatures[full_graph.SEARCH_WITH_OPTIONS](query=tf.range(16), **_options(graph))
  np.testing.assert_array_equal(with_options["ids"].numpy(), expected["ids"].numpy())
  embeddings = loaded.signatures[full_graph.ENCODE_ITEM](row=tf.range(3))
  assert set(embeddings) == {"embeddings_semantic", "embeddings_efficiency"}


@pytest.mark.parametrize("slope, intercept", [(3.0, -1.0), (-3.0, -3.0), (-8.0, -6.0)])
def test_fit_calibration_recovers_slopes_far_from_its_start(slope, intercept):
  # Scores spread over several units (unnormalized towers): a full Newton step from slope 1
  # overshoots, and undamped the fit oscillated off to |slope| ~ 1e8.
  rng = np.random.default_rng(2)
  scores = 3.0 * rng.normal(size=4000)
  labels = rng.random(4000) < 1 / (1 + np.exp(-(slope * scores + intercept)))
  fitted = channels.fit_calibration(scores, labels)
  assert abs(fitted.slope - slope) < 0.35 * abs(slope) and abs(fitted.intercept - intercept) < 0.35 * abs(intercept)
