"""fgr-refresh on a channel graph: every channel's mask and index follow the delta, under N's graph or traced."""

import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from engine import base, channels, full_graph
from export import (
  channel_exporter,
  exporter,
  refresh,
  refresh_channels,
  refresh_delta,
  refresh_policy,
  refresh_state,
  version_files,
  version_report,
  versions,
  warmup,
)
from models import catalog as catalog_lib
from models import precision as precision_lib
from models.data import schema
from tests.export import channels_testlib, checkpoint_testlib

NAMES = ("semantic", "efficiency")
NUM_ITEMS, DEPTH, K = 300, 10, 10
IDS = np.asarray([f"ad{i}" for i in range(NUM_ITEMS)], dtype=object)


def _queries(ad_ids):
  """Query features aimed at `ad_ids` (their ids as the first query token)."""
  n = len(ad_ids)
  return {
    schema.USER_ID: np.asarray([f"u{i}" for i in range(n)], dtype=object),
    schema.USER_FEATURES: schema.pad_tokens([[] for _ in ad_ids], schema.USER_FEATURES_LEN),
    schema.QUERY_TOKENS: schema.pad_tokens([[ad_id] for ad_id in ad_ids], schema.QUERY_TOKENS_LEN),
    schema.HIST_IDS: schema.pad_tokens([[] for _ in ad_ids], schema.HISTORY_LEN),
    schema.HIST_CATEGORIES: schema.pad_tokens([[] for _ in ad_ids], schema.HISTORY_LEN),
    schema.HIST_BRANDS: schema.pad_tokens([[] for _ in ad_ids], schema.HISTORY_LEN),
  }


def _export(base_path: str, index: str) -> None:
  """Version 1: a two-channel graph over the catalog, published as fgr-export publishes one."""
  built, catalogs, calibration = [], {}, {}
  for name in NAMES:
    query_tower, item_tower = (
      channels_testlib.HashTower(schema.QUERY_TOKENS, name),
      channels_testlib.HashTower(schema.AD_ID, name),
    )
    embeddings = item_tower({schema.AD_ID: tf.constant(IDS.astype(str))}).numpy()
    eligible = np.ones([NUM_ITEMS], bool)
    click = channels.Calibration(5.0, -2.0)
    relevance = channels.Calibration(8.0, -1.0) if name == "semantic" else None
    built.append(
      channels.Channel(
        name,
        query_tower,
        item_tower,
        base.build_index(index, embeddings, k=DEPTH, eligible=eligible),
        embeddings,
        DEPTH,
        click,
        relevance,
      )
    )
    catalogs[name] = catalog_lib.EmbeddedCatalog(IDS, embeddings, eligible)
    calibration[name] = {"click": click.to_json(), **({"relevance": relevance.to_json()} if relevance else {})}
  defaults = channels.Defaults(weights=(1.0, 1.0), depths=(DEPTH, DEPTH))
  graph = channels.ChannelGraph(built, IDS, K, defaults, schema.query_specs(), schema.item_specs())
  result = channel_exporter.BuiltChannels(
    graph,
    catalogs,
    _queries(IDS[:4]),
    recall={},
    calibration=calibration,
    timings={},
    serving=precision_lib.ServingOptions("float32", False),
    data={"source": "test"},
  )
  config = exporter.ExportConfig(index=index, k=K, num_warmup_requests=4)
  channel_exporter.publish_channels(result, base_path, config, channel_exporter.ChannelOptions(depth=DEPTH))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Version 1 with each backend: ScaNN (its graph serves a new catalog) and brute force (it does not)."""
  import scann  # noqa: F401  Registers ScaNN's ops for loading versions in this process.

  paths = {}
  for index in ("scann", "brute_force"):
    path = str(tmp_path_factory.mktemp(index))
    _export(path, index)
    paths[index] = os.path.join(path, "1")
  return paths


def _base_path(exported, tmp_path, index):
  path = str(tmp_path / "models")
  version_files.link_tree(exported[index], os.path.join(path, "1"))
  return path


def _top(version_path, ad_ids):
  """The ids served for queries aimed at `ad_ids`: by serving_default, and by each channel alone."""
  loaded = tf.saved_model.load(version_path)
  tensors = {name: tf.constant(values) for name, values in _queries(ad_ids).items()}
  out = {"merged": loaded.signatures["serving_default"](**tensors)["ids"].numpy().astype(str)}
  for c, name in enumerate(NAMES):
    options = {
      channels.CHANNEL_WEIGHTS: tf.constant([1.0 if i == c else 0.0 for i in range(len(NAMES))]),
      channels.CHANNEL_DEPTHS: tf.constant([DEPTH if i == c else 0 for i in range(len(NAMES))]),
      channels.MIN_RELEVANCE: tf.constant(0.0),
      channels.DIVERSITY: tf.constant("none"),
      channels.DIVERSITY_WINDOW: tf.constant(10),
      channels.SSD_GAMMA: tf.constant(0.25),
      channels.DPP_THETA: tf.constant(0.5),
    }
    signature = loaded.signatures[full_graph.SEARCH_WITH_OPTIONS]
    out[name] = signature(**tensors, **options)["ids"].numpy().astype(str)
  return out


def _lines(*records):
  return refresh_delta.parse_lines([json.dumps(record) for record in records])


def test_pause_upsert_and_removal_move_every_channel_under_the_graph_of_version_1(exported, tmp_path):
  base_path = _base_path(exported, tmp_path, "scann")
  aimed = ["ad7", "ad42"]
  before = _top(exported["scann"], aimed)
  for name in NAMES:
    np.testing.assert_array_equal(before[name][:, 0], aimed)  # Each channel alone finds the ad aimed at.
  refresher = refresh.Refresher(base_path)

  # (1) Pausing: only every channel's mask changes, and neither channel returns the ad any more.
  report = refresher.apply(_lines({"ad_id": "ad7", "status": "paused"}))
  assert report["kind"] == "status_only" and report["version"] == 2
  assert report["channels"] == list(NAMES) and "calibration" in report and report["data"] == {"source": "test"}
  assert checkpoint_testlib.differing_tensors(exported["scann"], report["path"]) == [
    full_graph.variable_key(f"{refresh_channels.index_path(i)}/{base.ELIGIBLE}") for i in range(len(NAMES))
  ]
  after = _top(report["path"], aimed)
  for served in after.values():
    assert "ad7" not in served[0] and "" not in served[0]
  assert after["semantic"][1, 0] == "ad42"

  # (2) A new ad and a removal: rebuilt in every channel, served under version 2's graph (3).
  report = refresher.apply(
    _lines({"ad_id": "fresh-ad", "category": "c", "tokens": ["x"]}, {"ad_id": "ad42", "deleted": True})
  )
  assert report["kind"] == "rebuild" and report["version"] == 3 and report["refreshed_from"] == 2
  assert report["delta"] == {"added": 1, "changed": 0, "removed": 1, "ignored_removals": 0, "status_changes": 0}
  assert report["graph"] == "version 2's", report.get("graph_traced_because")
  assert os.path.samefile(
    os.path.join(exported["scann"], "saved_model.pb"), os.path.join(report["path"], "saved_model.pb")
  )
  assert set(report[refresh_state.CHANNEL_INDEX_CONFIGS]) == set(NAMES) and report["channel_defaults"]["depths"]
  assert report[refresh_channels.WARMUP_RECALL] == {name: 1.0 for name in NAMES}
  assert report["index_options"] == {}  # Tuned knobs stay in each channel's config.
  after = _top(report["path"], ["fresh-ad", "ad42", "ad7"])
  for name in NAMES:
    assert after[name][0, 0] == "fresh-ad"
  for served in after.values():
    assert "ad42" not in served and "ad7" not in served and "" not in served
  source = refresh_channels.ChannelSource.read(base_path, 3)
  for name in NAMES:
    embeddings = np.load(refresh_state.embeddings_path(report["path"], name))
    assert embeddings.shape == (NUM_ITEMS, channels_testlib.DIM)
    expected = channels_testlib.HashTower(schema.AD_ID, name)({schema.AD_ID: tf.constant(["fresh-ad"])}).numpy()[0]
    np.testing.assert_allclose(embeddings[source.row_of["fresh-ad"]], expected, atol=1e-6)
  assert not source.eligible[source.row_of["ad7"]] and "ad42" not in source.row_of

  # Rollback republishes version 2, and the next refresh starts from it.
  assert refresher.rollback(2)["version"] == 4
  report = refresher.apply(_lines({"ad_id": "ad7", "status": "active"}))
  assert report["refreshed_from"] == 4 and report["kind"] == "status_only"
  np.testing.assert_array_equal(_top(report["path"], aimed)["semantic"], before["semantic"])
  # The same delta again changes nothing, in any channel: nothing is published.
  unchanged = refresher.apply(_lines({"ad_id": "ad7", "status": "active"}))
  assert unchanged["published"] is False and unchanged["version"] == report["version"]
  assert versions.list_versions(base_path)[-1] == report["version"]


def test_bad_deltas_publish_nothing(exported, tmp_path):
  base_path = _base_path(exported, tmp_path, "scann")
  refresher = refresh.Refresher(base_path)
  with pytest.raises(ValueError, match="not in the catalog"):
    refresher.apply(_lines({"ad_id": "nope", "status": "paused"}))
  removals = [{"ad_id": ad_id, "deleted": True} for ad_id in IDS[: NUM_ITEMS - DEPTH + 1]]
  with pytest.raises(ValueError, match=f"fewer than channel semantic's depth {DEPTH}"):
    refresher.apply(_lines(*removals))
  assert versions.list_versions(base_path) == [1]


def test_a_backend_whose_graph_depends_on_its_build_is_traced_anew(exported, tmp_path):
  base_path = _base_path(exported, tmp_path, "brute_force")
  refresher = refresh.Refresher(base_path)
  report = refresher.apply(
    _lines(
      {"ad_id": "fresh-ad", "category": "c"}, {"ad_id": "ad3", "deleted": True}, {"ad_id": "ad9", "status": "paused"}
    )
  )
  assert report["graph"] == "traced" and "channel semantic" in report["graph_traced_because"]
  path = report["path"]
  # Every channel's towers are version 1's, variables included.
  checkpoint = tf.train.load_checkpoint(version_files.variables_prefix(path))
  scales = [key for key in checkpoint.get_variable_to_shape_map() if "/scale/" in key]
  assert len(scales) == 2 * len(NAMES) and all(checkpoint.get_tensor(key) == 1.0 for key in scales), scales
  assert os.path.exists(version_files.extra_path(path, warmup.WARMUP_FILE))
  assert report["channels"] == list(NAMES) and report["calibration_examples"] == 4
  after = _top(path, ["fresh-ad", "ad3", "ad9"])
  for name in NAMES:
    assert after[name][0, 0] == "fresh-ad"
  for served in after.values():
    assert "ad3" not in served and "ad9" not in served
  # The traced version's towers are version 1's functions: refreshing it again embeds the same way.
  report = refresh.Refresher(base_path).apply(_lines({"ad_id": "second-ad", "brand": "b"}))
  assert report["graph"] == "traced" and report["num_items"] == NUM_ITEMS + 1
  assert _top(report["path"], ["second-ad"])["efficiency"][0, 0] == "second-ad"


def test_each_channel_rebuilds_at_its_depth_with_its_own_tuned_knobs():
  state = refresh_state.CatalogState(
    IDS, np.zeros([NUM_ITEMS, channels_testlib.DIM], np.float32), np.ones([NUM_ITEMS], bool)
  )
  configs = {"semantic": {"leaves_to_search": 5}, "efficiency": {"leaves_to_search": 9}}
  report = version_report.VersionReport(
    version=1,
    path="unused",
    index="scann",
    k=K,
    index_options={"num_leaves": 50},
    index_config=configs["semantic"],
    extra={
      refresh_channels.CHANNELS: list(NAMES),
      refresh_channels.CHANNEL_DEFAULTS: {"depths": [DEPTH, 2 * DEPTH]},
      refresh_state.CHANNEL_INDEX_CONFIGS: configs,
    },
  )
  source = refresh_channels.ChannelSource(1, "unused", report, list(NAMES), dict.fromkeys(NAMES, state), {})
  views = [source.channel_view(i).report for i in range(len(NAMES))]
  assert [view.k for view in views] == [DEPTH, 2 * DEPTH]
  options = [refresh_policy.rebuild_options(view) for view in views]
  assert [o["leaves_to_search"] for o in options] == [5, 9] and all(o["num_leaves"] == 50 for o in options)
  # A report from before per-channel configs: the top-level config is the first channel's only.
  del report.extra[refresh_state.CHANNEL_INDEX_CONFIGS]
  assert source.index_config(0) == configs["semantic"] and source.index_config(1) == {}


def test_a_version_with_an_inverted_calibration_is_refreshed_with_a_warning(exported, tmp_path, caplog):
  """fgr-export refuses a slope <= 0 now; a version exported before keeps serving and refreshing, and says so."""
  base_path = _base_path(exported, tmp_path, "brute_force")
  version_path = os.path.join(base_path, "1")
  report = version_report.read(version_path)
  report.extra[channel_exporter.CALIBRATION][NAMES[0]]["click"]["slope"] = -20.3
  os.remove(version_report.path(version_path))  # A hard link to the fixture's report: replace it, never write through.
  version_report.write(version_path, report)
  with caplog.at_level(logging.WARNING):
    refresh_channels.ChannelSource.read(base_path, 1)
  assert f"channel {NAMES[0]}'s click calibration has slope -20.3" in caplog.text
  assert f"channel {NAMES[1]}'s" not in caplog.text


def test_a_structure_override_leaves_no_stale_tuned_knob_in_the_report():
  """An --index_options override of the tree's structure makes each channel tune its search knobs anew.
  The report kept the source's tuned knobs beside the override, so the next plain refresh found them
  differing from what the channels were built with, trained every channel again, and went back to them."""
  state = refresh_state.CatalogState(
    IDS, np.zeros([NUM_ITEMS, channels_testlib.DIM], np.float32), np.ones([NUM_ITEMS], bool)
  )
  tuned = {"num_leaves": 20, "leaves_to_search": 5, "reorder": 100}
  report = version_report.VersionReport(
    version=1,
    path="unused",
    index="scann",
    k=K,
    index_options=dict(tuned),  # Set by hand at export: what a refreshed version's report holds.
    index_config=dict(tuned),
    extra={
      refresh_channels.CHANNELS: list(NAMES),
      refresh_channels.CHANNEL_DEFAULTS: {"depths": [DEPTH, DEPTH]},
      refresh_state.CHANNEL_INDEX_CONFIGS: dict.fromkeys(NAMES, tuned),
    },
  )
  source = refresh_channels.ChannelSource(1, "unused", report, list(NAMES), dict.fromkeys(NAMES, state), {})
  for overrides, expected in (({"num_leaves": 10}, {"num_leaves": 10}), ({}, tuned), (None, tuned)):
    rebuilt = {
      name: refresh_policy.rebuild_options(source.channel_view(i).report, overrides) for i, name in enumerate(NAMES)
    }
    assert refresh_channels.shared_index_options(report.index_options, overrides, rebuilt) == expected, overrides
