"""fgr-export --cooccurrence: the fused item-to-item channel serves ItemCF's ranking and follows every refresh."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from export import exporter, refresh, refresh_checkpoint, refresh_delta, refresh_state, version_files, version_report
from models import baselines
from models import config as config_lib
from models.data import queries as queries_lib
from models.data import schema, sources
from tests.conftest import SCANN_EXPORT_K
from tests.export import delta_testlib

K = SCANN_EXPORT_K


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
  """Version 1 with the channel alone ranking (fusion weight 0), its source and held-out queries."""
  import scann  # noqa: F401  Registers ScaNN's ops for loading versions in this process.

  base_path = str(tmp_path_factory.mktemp("cooccurrence_export"))
  # Every co-occurring item kept, so the served ranking is the ItemCF baseline's itself.
  config = exporter.ExportConfig(
    index="scann",
    k=K,
    eval_queries=20,
    num_warmup_requests=4,
    exclude_history=True,
    cooccurrence=True,
    cooccurrence_neighbours=3000,
    fusion_weight=0.0,
  )
  report = exporter.export_model(trained_run, base_path, config)
  source = sources.open_source(sources.DataSpec.from_json(config_lib.read_run_config(trained_run)["data"]))
  queries = queries_lib.held_out_queries(source, 8)
  return report, source, queries


def _serve(version_path, queries):
  serve = tf.saved_model.load(version_path).signatures["serving_default"]
  out = serve(**{name: tf.constant(values) for name, values in queries.items()})
  return out["ids"].numpy().astype(str), out["scores"].numpy()


def _itemcf_scores(source, queries):
  """[Q, N] ItemCF baseline similarities (no popularity tie-break), -inf for the request's history."""
  fitted = baselines.ItemCooccurrence(source.num_items).fit(source.examples("train"), source.row_of)
  batch = {**queries, schema.AD_ID: np.full([len(queries[schema.HIST_IDS])], "")}  # Only its length is read.
  scores = fitted.similarity(batch, source.row_of)
  history = baselines.catalog_rows(queries[schema.HIST_IDS], source.row_of)
  for q, rows in enumerate(history):
    scores[q, rows[rows >= 0]] = -np.inf
  return scores


@pytest.fixture(scope="module")
def reference(exported):
  """The ItemCF baseline's scores [Q, N] of the held-out queries (see `_itemcf_scores`), fit once."""
  _, source, queries = exported
  return _itemcf_scores(source, queries)


def _check_itemcf_order(reference, source, ids, gone=()):
  """The served ids with a co-occurrence vote come in ItemCF's order over active ads not `gone`, best first
  (ties in any order)."""
  catalog = source.features(np.arange(source.num_items))
  allowed = (catalog[schema.STATUS] == "active") & ~np.isin(catalog[schema.AD_ID], list(gone))
  checked = 0
  for q in range(len(ids)):
    candidates = np.where(allowed, reference[q], -np.inf)
    best = np.sort(candidates[candidates > 0])[::-1][:K]
    served = np.asarray([reference[q, source.row_of(x)] for x in ids[q][: len(best)]])
    np.testing.assert_allclose(served, best, rtol=1e-5)
    checked += len(best)
  assert checked > 2 * K  # The test requests have histories with co-occurring items.


def test_served_channel_ranks_as_the_itemcf_baseline_and_reports_it(exported, reference):
  report, source, queries = exported
  assert report["cooccurrence"] == {
    "history_feature": schema.HIST_IDS,
    "history": 10,
    "decay": 0.8,
    "neighbours": 3000,
    "fusion_weight": 0.0,
  }
  ids, _ = _serve(report["path"], queries)
  _check_itemcf_order(reference, source, ids)


def test_refreshes_keep_the_channel_over_the_new_catalog(exported, reference, tmp_path):
  report, source, queries = exported
  base_path = str(tmp_path / "models")
  version_files.link_tree(report["path"], os.path.join(base_path, "1"))
  before, _ = _serve(report["path"], queries)
  paused, removed = before[0, 0], before[0, 1]
  features = source.features(np.arange(source.num_items))
  # Version 2 reuses version 1's graph (ScaNN is exact here): the checkpoint's lookup follows the rows.
  delta = [json.dumps({"ad_id": removed, "deleted": True}), delta_testlib.ad_line("fresh-ad", features, 3)]
  refresher = refresh.Refresher(base_path, keep_versions=None, verify_recall=False)
  second = refresher.apply(refresh_delta.parse_lines(delta))
  assert second["graph"] == "version 1's" and second["cooccurrence"] == report["cooccurrence"]
  # Version 3 pauses one (status only); version 4 traces its graph anew around version 1's table.
  third = refresher.apply(refresh_delta.parse_lines([json.dumps({"ad_id": paused, "status": "paused"})]))
  assert third["kind"] == "status_only"
  leaves = version_report.read(report["path"]).index_config["leaves_to_search"] + 1
  fourth = refresh.Refresher(
    base_path, keep_versions=None, verify_recall=False, index_overrides={"leaves_to_search": leaves}
  ).apply(refresh_delta.parse_lines([delta_testlib.ad_line("another-ad", features, 4)]))
  assert fourth["graph"] == "traced" and fourth["cooccurrence"] == report["cooccurrence"]
  for version in (second, third, fourth):
    ids = refresh_state.read_state(version["path"]).ids
    served, _ = _serve(version["path"], queries)
    assert removed not in served and (version is second or paused not in served)
    _check_itemcf_order(reference, source, served, gone={removed} | ({paused} if version is not second else set()))
    assert len(ids) == source.num_items + (1 if version is not fourth else 2) - 1
  # The retraced version saved the same table.
  old = tf.train.load_checkpoint(version_files.variables_prefix(report["path"]))
  new = tf.train.load_checkpoint(version_files.variables_prefix(fourth["path"]))
  key = "cooccurrence/neighbours/.ATTRIBUTES/VARIABLE_VALUE"
  np.testing.assert_array_equal(old.get_tensor(key), new.get_tensor(key))
  fusion = refresh_checkpoint.saved_fusion(
    refresh_state.Source.read(base_path, 1), refresh_state.read_state(report["path"]).ids
  )
  assert {**fusion["cooccurrence"].config, "fusion_weight": fusion["fusion_weight"]} == report["cooccurrence"]


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="cooccurrence_neighbours"):
    exporter.ExportConfig(cooccurrence=True, cooccurrence_neighbours=0)
  with pytest.raises(ValueError, match="fusion_weight"):
    exporter.ExportConfig(cooccurrence=True, fusion_weight=-0.1)
