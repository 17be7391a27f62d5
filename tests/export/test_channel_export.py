"""Channels end to end: train both, export one graph, serve it per channel and merged, judge it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from engine import channels, full_graph
from export import channel_exporter, exporter, served_evaluation, version_report
from models import channels as channels_lib
from models import retrieval
from models import train as train_lib
from models.data import schema, sources
from tests.conftest import TINY_DATA, TINY_TOWER, TINY_TRAINING
from tests.data import logs_testlib

K = 10


@pytest.fixture(scope="module")
def channel_version(tmp_path_factory) -> str:
  run = str(tmp_path_factory.mktemp("channels"))
  names = [channels_lib.SEMANTIC, channels_lib.EFFICIENCY]
  for name in names:
    train_lib.train(
      TINY_DATA,
      channels_lib.channel_tower(name, TINY_TOWER),
      TINY_TRAINING,
      channels_lib.channel_dir(run, name),
    )
  channels_lib.write_channels(run, names, {})
  base_path = str(tmp_path_factory.mktemp("models"))
  options = channel_exporter.ChannelOptions(depth=20, calibration_examples=200)
  config = exporter.ExportConfig(index="brute_force", k=K, num_warmup_requests=3, eval_queries=50)
  return channel_exporter.export_channels(run, base_path, config, options)["path"]


def _inputs(report, **overrides):
  return channels.option_inputs({**report.extra["channel_defaults"], **overrides})


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"weights": {"semantic": float("nan")}}, r"^channel weights must be finite numbers >= 0, one per channel; got "),
    ({"weights": {"semantic": float("inf")}}, r"channel weights must be finite numbers >= 0.*got \{'semantic': inf\}$"),
    ({"diversity": "ssd", "gamma": float("inf")}, r"^ssd gamma must be a finite number >= 0; got inf$"),
    ({"theta": 1.0}, r"^dpp theta must be in \[0, 1\); got 1.0$"),
    ({"min_relevance": float("nan")}, r"^min_relevance must be in \[0, 1\]; got nan$"),
    ({"window": 2**40}, r"^window must fit in int32; got 1099511627776$"),
  ],
)
def test_channel_options_refuse_what_no_request_could_take(fields, message):
  """An inf weight or gamma was published, and then every request answered nothing or failed."""
  with pytest.raises(ValueError, match=message):
    channel_exporter.ChannelOptions(**fields)


def test_defaults_for_a_run_judge_its_weights_together():
  names = [channels_lib.SEMANTIC, channels_lib.EFFICIENCY]
  # A channel the flags leave out weighs 1, so one zero weight leaves the other channel to rank.
  defaults = channel_exporter.ChannelOptions(weights={"semantic": 0.0}).defaults(names, depth=20)
  assert defaults.weights == (0.0, 1.0) and defaults.depths == (20, 20)
  with pytest.raises(ValueError, match=r"^some channel weight must be > 0"):
    channel_exporter.ChannelOptions(weights={"semantic": 0.0, "efficiency": 0.0}).defaults(names, depth=20)
  with pytest.raises(ValueError, match=r"name channels this run lacks: \['sementic'\]"):
    channel_exporter.ChannelOptions(weights={"sementic": 2.0}).defaults(names, depth=20)


@pytest.mark.parametrize(
  "options, message",
  [
    (channel_exporter.ChannelOptions(weights={"semantic": 0.0, "efficiency": 0.0}), "some channel weight must be > 0"),
    # It failed in the calibration instead, blaming the channels' training.
    (
      channel_exporter.ChannelOptions(depth=3),
      r"^k must be in \[1, 6\] \(the sum of the channels' depths \[3, 3\]\), got 10",
    ),
  ],
)
def test_bad_defaults_or_an_unfillable_k_stop_the_export_before_any_tower_is_restored(
  tmp_path, monkeypatch, options, message
):
  channels_lib.write_channels(str(tmp_path), [channels_lib.SEMANTIC, channels_lib.EFFICIENCY], {})

  def must_not_run(*args, **kwargs):
    raise AssertionError("a tower was restored before the channel options were checked")

  monkeypatch.setattr(channel_exporter.train, "restore", must_not_run)
  with pytest.raises(ValueError, match=message):
    channel_exporter.build_channel_graph(str(tmp_path), exporter.ExportConfig(index="brute_force", k=10), options)


def test_value_weights_favour_converted_high_bid_clicks_at_mean_one():
  config = dataclasses.replace(TINY_TOWER, objective="value", conversion_weight=4.0, bid_exponent=1.0)
  weights = retrieval.value_weights(
    {"converted": tf.constant([True, False, False]), "bid": tf.constant([1.0, 1.0, 2.0])}, config
  )
  np.testing.assert_allclose(weights.numpy(), np.array([5.0, 1.0, 2.0]) / (8.0 / 3), rtol=1e-6)


@pytest.mark.parametrize(
  "bids,bid_exponent",
  [
    ([5e8, 2e8, 1e6], 5.0),  # Bids in micros: 5e8 ** 5 overflows float32, and inf / inf was NaN.
    ([3e38, 1e38, 1e37], 1.0),  # Near float32's largest: the converted one's value overflowed, the sum too.
  ],
)
def test_value_weights_of_values_beyond_float32_are_the_exact_ones(bids, bid_exponent):
  config = dataclasses.replace(TINY_TOWER, objective="value", conversion_weight=4.0, bid_exponent=bid_exponent)
  converted = np.array([True, False, False])
  weights = retrieval.value_weights({"converted": tf.constant(converted), "bid": tf.constant(bids, tf.float32)}, config)
  value = np.where(converted, 5.0, 1.0) * np.asarray(bids, dtype=np.float64) ** bid_exponent
  np.testing.assert_allclose(weights.numpy(), value / value.mean(), rtol=1e-4)


def test_value_weights_are_zero_when_every_bid_is_and_one_at_bid_exponent_zero():
  bids = {"converted": tf.constant([True, False]), "bid": tf.constant([0.0, 0.0])}
  config = dataclasses.replace(TINY_TOWER, objective="value", conversion_weight=4.0)
  np.testing.assert_array_equal(retrieval.value_weights(bids, config).numpy(), [0.0, 0.0])
  config = dataclasses.replace(config, bid_exponent=0.0)  # bid ** 0 is 1: only conversions weigh.
  np.testing.assert_allclose(retrieval.value_weights(bids, config).numpy(), [5 / 3, 1 / 3], rtol=1e-6)


def test_the_export_serves_each_channel_and_their_merge(channel_version):
  report = version_report.read(channel_version)
  assert report.extra["channels"] == ["semantic", "efficiency"]
  assert set(report.extra["calibration"]["semantic"]) == {"click", "relevance"}
  # A higher score is a likelier click in every channel (and a likelier on-topic ad).
  assert all(c["click"]["slope"] > 0 for c in report.extra["calibration"].values())
  assert report.extra["calibration"]["semantic"]["relevance"]["slope"] > 0
  loaded = tf.saved_model.load(channel_version)
  source = sources.open_source(TINY_DATA)
  batch = next(iter(source.examples("test")))
  features = {name: tf.constant(batch[name][:8]) for name in schema.QUERY_FEATURE_NAMES}
  merged = loaded.signatures[full_graph.SERVING_DEFAULT](**features)
  ids = merged["ids"].numpy().astype(str)
  assert ids.shape == (8, K) and all(len(set(row)) == K for row in ids)
  statuses = source.features(np.asarray([source.row_of(i) for i in ids.ravel()]))[schema.STATUS]
  assert (statuses == "active").all()  # Paused ads stay masked in every channel.
  labels = set(merged["channels"].numpy().ravel().astype(str))
  assert labels <= {"semantic", "efficiency", "semantic+efficiency"}
  search = loaded.signatures[full_graph.SEARCH_WITH_OPTIONS]
  alone = search(**features, **_inputs(report, weights=[0.0, 1.0], depths=[0, 20]))
  assert set(alone["channels"].numpy().ravel().astype(str)) <= {"efficiency", "semantic+efficiency"}
  diverse = search(**features, **_inputs(report, diversity="ssd", gamma=2.0))
  assert diverse["ids"].shape == (8, K)
  with pytest.raises(tf.errors.InvalidArgumentError, match="diversity"):
    search(**features, **_inputs(report, diversity="mmr"))


def test_served_evaluation_reports_every_channel_merged_and_reranked(channel_version):
  report = version_report.read(channel_version)
  every = served_evaluation.variants(report)
  assert set(every) == {"semantic", "efficiency", "merged", "merged_ssd", "merged_dpp"}
  # DPP's own figures are the re-rankers' tests' business; here each kind of setting once.
  settings = {name: knobs for name, knobs in every.items() if name != "merged_dpp"}
  # Each query is searched on its own, so the batch size changes no figure; but the graph's XLA
  # re-rankers compile once per batch shape, and a batch of 150 compiled about 3x longer than 10.
  result = served_evaluation.evaluate_version(
    channel_version, sources.open_source(TINY_DATA), max_examples=150, batch_size=10, settings=settings
  )
  variants = result["variants"]
  assert set(variants) == set(settings) and result["num_examples"] == 150
  for point in variants.values():
    for key in (
      "click_coverage",
      "conversion_coverage",
      "noise_ratio",
      "revenue_per_query",
      "ilad@10",
      "categories@10",
    ):
      assert np.isfinite(point[key]), key
  # The semantic channel is trained to stay on the query's topic.
  assert variants["semantic"]["noise_ratio"] <= variants["efficiency"]["noise_ratio"] + 0.05


def test_a_test_split_within_the_calibration_examples_says_how_to_leave_some(tmp_path):
  logs_testlib.write_tiny_logs(str(tmp_path), num_events=64)  # The last 10% in time: 6 test examples.
  source = sources.open_source(sources.DataSpec(name="logs", data_dir=str(tmp_path)))
  message = (
    r"^no test examples are left to evaluate: the test split has 6 and the export calibrated on the first 2000; "
    r"export again with a lower fgr-export --calibration_examples$"
  )
  with pytest.raises(ValueError, match=message):
    served_evaluation._uncalibrated_examples(source, 2000, max_examples=0, batch_size=256)
  assert sum(len(b[schema.AD_ID]) for b in served_evaluation._uncalibrated_examples(source, 4, 0, 256)) == 2


def _calibration_case(hit_rate: float, clicked_rank: tuple[int, int], missed_rank: tuple[int, int], seed: int = 0):
  """Two channels over one catalog and the clicked ad of each query (see the calibration tests).

  The semantic channel's click is its hit-th best ad for a `hit_rate` share of the queries (hit in
  `clicked_rank`), else one far below its cut-off (in `missed_rank`); the efficiency channel scores a
  noisy copy of the semantic embeddings. Returns (names, found, queries, embeddings, positives).
  """
  rng = np.random.default_rng(seed)
  num_queries, num_items, dim, depth = 400, 300, 8, 20

  def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

  query = unit(rng.normal(size=[num_queries, dim]))
  items = unit(rng.normal(size=[num_items, dim]))
  noisy = unit(items + 0.2 * rng.normal(size=items.shape))
  order = np.argsort(-(query @ items.T), axis=1)
  hit = rng.random(num_queries) < hit_rate
  rank = np.where(hit, rng.integers(*clicked_rank, num_queries), rng.integers(*missed_rank, num_queries))
  positives = order[np.arange(num_queries), rank]
  found = [order[:, :depth], np.argsort(-(query @ noisy.T), axis=1)[:, :depth]]
  return ["semantic", "efficiency"], found, [query, query], [items, noisy], positives


def test_calibration_fits_what_the_merge_ranks_not_missed_clicks_at_their_own_scores():
  # A weak channel: 30% of the clicks in its top 5, the rest far below its top 20.
  names, found, queries, embeddings, positives = _calibration_case(0.3, (0, 5), (150, 300))
  # The old sample, the channel's top 20 plus each missed click at its own score, has every missed
  # click below every negative of its query: its fit inverts the channel.
  missed = ~np.any(found[0] == positives[:, np.newaxis], axis=1)
  top = np.einsum("qd,qmd->qm", queries[0], embeddings[0][found[0]])
  clicked_scores = np.einsum("qd,qd->q", queries[0], embeddings[0][positives])
  old = channels.fit_calibration(
    np.concatenate([top.ravel(), clicked_scores[missed]]),
    np.concatenate([(found[0] == positives[:, np.newaxis]).ravel(), np.ones(missed.sum(), bool)]),
  )
  assert old.slope < -1
  fitted = channel_exporter._calibrate(names, found, queries, embeddings, positives)
  assert set(fitted) == set(names) and all(relevance is None for _, relevance in fitted.values())
  semantic, efficiency = fitted["semantic"][0], fitted["efficiency"][0]
  assert semantic.slope > 1 and efficiency.slope > 0
  # Fit on the merged candidates, a click is likelier at a channel's best score than at its worst.
  lowest, highest = float(top.min()), float(top.max())
  assert semantic.slope * (highest - lowest) > 1


def test_a_channel_whose_scores_do_not_rank_clicks_stops_the_export():
  # Every click is the 18th-20th of the semantic channel's 20: its higher scores are never clicked.
  names, found, queries, embeddings, positives = _calibration_case(1.0, (17, 20), (17, 20))
  with pytest.raises(ValueError, match=r"^channel semantic: its click calibration's fitted slope is -\d.*, not > 0"):
    channel_exporter._calibrate(names[:1], found[:1], queries[:1], embeddings[:1], positives)


def test_calibration_without_a_recalled_click_says_what_to_raise():
  names, found, queries, embeddings, positives = _calibration_case(0.0, (0, 1), (299, 300))
  found = [found[0], found[0]]  # Neither channel reaches the clicked ads.
  with pytest.raises(ValueError, match="no channel recalls the clicked ad of any of the 400 calibration examples"):
    channel_exporter._calibrate(names, found, queries, embeddings, positives)
