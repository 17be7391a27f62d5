"""A refresh reuses a version's graph only at the search depth (k + exclusion depth) it was traced for."""

import json

import numpy as np
import pytest
import tensorflow as tf

from engine import base
from export import exporter, refresh, refresh_delta, refresh_state
from models import config as config_lib
from models.data import queries as queries_lib
from models.data import schema, sources

K = 10


@pytest.fixture(scope="module")
def excluding_export(trained_run, tmp_path_factory):
  """(base path, version 1's report) of a ScaNN export excluding the history: its graph asks for k + 20."""
  import scann  # noqa: F401  Registers ScaNN's ops for loading versions in this process.

  base_path = str(tmp_path_factory.mktemp("excluding_export"))
  config = exporter.ExportConfig(index="scann", k=K, eval_queries=20, num_warmup_requests=4, exclude_history=True)
  return base_path, exporter.export_model(trained_run, base_path, config)


def test_a_catalog_shrunk_below_the_search_depth_is_served_by_a_new_graph(excluding_export, trained_run):
  base_path, report = excluding_export
  ids = refresh_state.read_state(report["path"]).ids
  # At least the k * overfetch (2) candidates ScaNN fetches for k, fewer than the k + 20 the graph asks for.
  remaining = K + 15
  delta = refresh_delta.parse_lines([json.dumps({"ad_id": ad_id, "deleted": True}) for ad_id in ids[remaining:]])
  second = refresh.Refresher(base_path, keep_versions=None, verify_recall=False).apply(delta)
  assert second["graph"] == "traced" and "searches 30 candidates" in second["graph_traced_because"]
  # Version 1's graph would fail every request ("input must have at least k columns. Had 25, needed 30").
  source = sources.open_source(sources.DataSpec.from_json(config_lib.read_run_config(trained_run)["data"]))
  queries = queries_lib.held_out_queries(source, 4)
  serve = tf.saved_model.load(second["path"]).signatures["serving_default"]
  served = base.decoded_strings(serve(**{name: tf.constant(v) for name, v in queries.items()})["ids"])
  history = base.decoded_strings(queries[schema.HIST_IDS])
  for row, named in zip(served, history):
    assert set(row) - {""} <= set(ids[:remaining].tolist())
    assert not (set(row) & (set(named.tolist()) - {""}))
  assert np.count_nonzero(served != "") >= K  # Ads remain to answer with.


def test_the_index_is_built_for_the_candidates_the_graph_asks(trained_run, tmp_path, monkeypatch):
  # The k answers left after the history lie up to k + exclusion_depth deep: an index tuned for recall@k
  # finds those deeper ones less often (a ScaNN tree: 0.87 against exact, 0.98 once tuned at the depth).
  built_for = []
  build_index = base.build_index

  def recording_build_index(backend, embeddings, *, k, **options):
    built_for.append(k)
    return build_index(backend, embeddings, k=k, **options)

  monkeypatch.setattr(base, "build_index", recording_build_index)
  base_path = str(tmp_path / "models")
  config = exporter.ExportConfig(
    index="brute_force", k=K, exclude_history=True, exclusion_depth=7, eval_queries=10, num_warmup_requests=2
  )
  report = exporter.export_model(trained_run, base_path, config)
  assert built_for == [K + 7] and report["exclusion_depth"] == 7
  delta = refresh_delta.parse_lines([json.dumps({"ad_id": "ad1", "deleted": True})])
  refresh.Refresher(base_path, keep_versions=None, verify_recall=False, index_update="full").apply(delta)
  assert built_for == [K + 7, K + 7]  # A refresh's rebuild too.
