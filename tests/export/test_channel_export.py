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


def test_value_weights_favour_converted_high_bid_clicks_at_mean_one():
  config = dataclasses.replace(TINY_TOWER, objective="value", conversion_weight=4.0, bid_exponent=1.0)
  weights = retrieval.value_weights(
    {"converted": tf.constant([True, False, False]), "bid": tf.constant([1.0, 1.0, 2.0])}, config
  )
  np.testing.assert_allclose(weights.numpy(), np.array([5.0, 1.0, 2.0]) / (8.0 / 3), rtol=1e-6)


def test_the_export_serves_each_channel_and_their_merge(channel_version):
  report = version_report.read(channel_version)
  assert report.extra["channels"] == ["semantic", "efficiency"]
  assert set(report.extra["calibration"]["semantic"]) == {"click", "relevance"}
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
