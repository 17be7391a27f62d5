"""fgr-refresh with a tree-AH ScaNN index: incremental updates from N's training, and when it retrains."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from engine import base, scann_backend, scann_index, scann_update
from export import exporter, refresh, refresh_delta, refresh_state, refresh_watch, version_files, version_report
from models import train
from models.data import queries as queries_lib
from models.data import schema, sources
from tests.export import delta_testlib

K = 20
# Tree + AH + reordering on the 3k-ad catalog (the defaults would pick brute force at this size).
TREE_AH = {"scoring": "ah", "num_leaves": 30, "reorder": 100, "training_sample_size": 3000}


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
  """Version 1 with a tree-AH ScaNN index, the data source and held-out queries."""
  import scann  # noqa: F401  pylint: disable=unused-import  Registers ScaNN's ops for loading versions in this process.

  base_path = str(tmp_path_factory.mktemp("exported_ah"))
  exporter.export_model(
    trained_run,
    base_path,
    exporter.ExportConfig(index="scann", k=K, eval_queries=20, num_warmup_requests=4, index_options=TREE_AH),
  )
  _, run_config = train.restore(trained_run)
  source = sources.open_source(sources.DataSpec.from_json(run_config["data"]))
  return os.path.join(base_path, "1"), source, queries_lib.held_out_queries(source, 200)


@pytest.fixture(scope="module")
def served_v1(exported):
  """Version 1's served ids and recall@K on the held-out queries, loaded once for the module's tests."""
  version_path, _, queries = exported
  return _served_and_recall(version_path, queries)


@pytest.fixture
def base_path(exported, tmp_path):
  path = str(tmp_path / "models")
  version_files.link_tree(exported[0], os.path.join(path, "1"))
  return path


def _served_and_recall(version_path, queries):
  """(served ids [Q, K], recall@K of serving_default against exact search over the version's catalog)."""
  loaded = tf.saved_model.load(version_path)
  tensors = {name: tf.constant(values) for name, values in queries.items()}
  served = loaded.signatures["serving_default"](**tensors)["ids"].numpy().astype(str)
  query_embeddings = loaded.signatures["encode_query"](**tensors)["embedding"].numpy()
  state = refresh_state.read_state(version_path)
  scores = query_embeddings @ np.asarray(state.embeddings).T
  scores[:, ~state.eligible] = -np.inf
  exact = state.ids[np.argsort(-scores, axis=1)[:, :K]]
  _served_and_recall.last_exact = exact
  return served, float(np.mean([len(set(a) & set(b)) / K for a, b in zip(served, exact)]))


def _delta(source, before, seed, catalog):
  """About 4% of the catalog: 60 new ads, 40 changed, 10 removed, 10 paused, and probe ads.

  `catalog` holds the ad ids of the version the delta applies to (earlier deltas removed some).
  """
  rng = np.random.default_rng(seed)
  features = source.features(np.arange(source.num_items))
  row_of = {ad_id: row for row, ad_id in enumerate(features[schema.AD_ID])}
  probe = set(before[0, :3])
  others = [
    row
    for row in rng.permutation(source.num_items)
    if features[schema.AD_ID][row] not in probe and features[schema.AD_ID][row] in catalog
  ][:60]
  lines = [
    delta_testlib.ad_line(f"fresh-{seed}-probe", features, row_of.get(before[0, 0], 0)),
    json.dumps({"ad_id": before[0, 1], "deleted": True}),
    json.dumps({"ad_id": before[0, 2], "status": "paused"}),
  ]
  lines += [
    delta_testlib.ad_line(f"fresh-{seed}-{i}", features, row) for i, row in enumerate(rng.choice(source.num_items, 60))
  ]
  lines += [
    delta_testlib.ad_line(features[schema.AD_ID][row], features, (row + 1) % source.num_items) for row in others[:40]
  ]
  lines += [json.dumps({"ad_id": features[schema.AD_ID][row], "deleted": True}) for row in others[40:50]]
  lines += [json.dumps({"ad_id": features[schema.AD_ID][row], "status": "paused"}) for row in others[50:60]]
  return refresh_delta.parse_lines(lines)


def test_incremental_rebuild_reuses_training_and_matches_full_rebuild_recall(exported, served_v1, base_path):
  version_path, source, queries = exported
  before, recall_v1 = served_v1
  delta = _delta(source, before, 1, set(refresh_state.read_state(version_path).ids))
  report = refresh.Refresher(base_path, keep_versions=None).apply(delta)
  assert report["index_update"] == "incremental" and report["delta"]["added"] == 61
  config = report["index_config"]
  assert config["encoded_rows"] == 61 + 40 == config["rows_encoded_since_training"]
  assert config["train_seconds"] == 0.0  # No training at all (how fast the update is: bench/freshness.py).
  assert config["leaves_to_search"] == version_report.read(version_path).index_config["leaves_to_search"]
  assert report["graph"] == "version 1's"  # Same knobs: version 1's graph over the new variables.
  # The exact fallback reads ScaNN's float dataset: the catalog's vectors are not saved twice.
  checkpoint = tf.train.load_checkpoint(version_files.variables_prefix(report["path"]))
  rows = len(refresh_state.read_state(report["path"]).ids)
  dtypes = checkpoint.get_variable_to_dtype_map()
  float_tables = [
    key
    for key, shape in checkpoint.get_variable_to_shape_map().items()
    if key.startswith("index/") and len(shape) == 2 and shape[0] == rows and dtypes[key] == tf.float32
  ]
  assert len(float_tables) == 1, float_tables

  # N's training is kept, and the rows the delta did not touch keep their tokens and codes.
  old_state, new_state = refresh_state.read_state(version_path), refresh_state.read_state(os.path.join(base_path, "2"))
  old = scann_update.ScannAssets.from_checkpoint(version_files.variables_prefix(version_path), old_state.embeddings)
  new = scann_update.ScannAssets.from_checkpoint(
    version_files.variables_prefix(os.path.join(base_path, "2")), new_state.embeddings
  )
  for name in ("scann_config", "serialized_partitioner", "ah_codebook"):
    assert getattr(old, name).tolist() == getattr(new, name).tolist(), name
  touched = set(delta.upserts)
  old_row = old_state.row_of()
  rows = [(row, old_row[ad_id]) for row, ad_id in enumerate(new_state.ids) if ad_id not in touched]
  assert len(rows) == source.num_items - 11 - 40
  new_rows, old_rows = np.asarray(rows).T
  np.testing.assert_array_equal(new.datapoint_to_token[new_rows], old.datapoint_to_token[old_rows])
  np.testing.assert_array_equal(new.hashed_dataset[new_rows], old.hashed_dataset[old_rows])

  # The answers follow the delta, and recall stays that of a full rebuild of the same catalog.
  served, incremental_recall = _served_and_recall(os.path.join(base_path, "2"), queries)
  # New and changed ads that exact search ranks in a query's top K: found about as often as by a full rebuild.
  exact = _served_and_recall.last_exact
  pairs = [(q, ad_id) for q in range(len(exact)) for ad_id in exact[q] if ad_id in delta.upserts]
  assert len(pairs) >= 10 and not {before[0, 1], before[0, 2]} & set(served.ravel())
  full = refresh.Refresher(base_path, from_version=1, keep_versions=None, index_update="full").apply(delta)
  assert full["index_update"] == "full" and full["index_config"]["full_build_reason"] == "--index_update=full"
  full_served, full_recall = _served_and_recall(full["path"], queries)
  new_found = np.mean([ad_id in served[q] for q, ad_id in pairs])
  full_new_found = np.mean([ad_id in full_served[q] for q, ad_id in pairs])
  print(
    f"recall@{K}: version 1 {recall_v1:.3f}, incremental {incremental_recall:.3f}, full rebuild {full_recall:.3f};"
    f" new ads found: incremental {new_found:.3f}, full rebuild {full_new_found:.3f} ({len(pairs)} pairs)"
  )
  # The update keeps version 1's partitioner, so its recall is version 1's (measured 0.001-0.009 below it
  # in five runs of 2026-11-22). A full rebuild trains a new 30-leaf partitioner whose recall is a draw:
  # full minus incremental was -0.03 to +0.077 in the same runs, so that bound only catches a wholesale loss.
  assert incremental_recall >= recall_v1 - 0.03 and incremental_recall >= full_recall - 0.12
  # Both shares are draws: each version's partitioner and tuned leaves_to_search come from ScaNN's
  # training on this run's export, and the full rebuild wins or loses by chance on ~155 pairs (its lead
  # has ranged from below 0 to over 0.3). The bound only catches an update that loses new ads wholesale,
  # e.g. by encoding them into the wrong leaves, which would find a small fraction of the full rebuild's.
  assert new_found >= 0.5 * full_new_found


def test_versions_saving_a_copy_of_the_vectors_still_refresh_under_their_graph(
  exported, trained_run, tmp_path, monkeypatch
):
  # Exports before 2026-12-01 saved the float vectors of the exact fallback next to ScaNN's dataset.
  init = scann_index.ScannIndex.__init__

  def with_copy(self, searcher, embeddings, *args, **kwargs):
    init(self, searcher, embeddings, *args, **kwargs)
    del self._vectors  # Tracked again after `vectors`, as those exports did (the checkpoint key follows the order).
    self.vectors = base.catalog_variable(embeddings, name="vectors")
    self._vectors = self.vectors

  monkeypatch.setattr(scann_index.ScannIndex, "__init__", with_copy)
  base_path = str(tmp_path / "old")
  exporter.export_model(
    trained_run,
    base_path,
    exporter.ExportConfig(index="scann", k=K, eval_queries=10, num_warmup_requests=2, index_options=TREE_AH),
  )
  monkeypatch.undo()
  version_path, source, queries = os.path.join(base_path, "1"), exported[1], exported[2]
  assert (
    "index/vectors/.ATTRIBUTES/VARIABLE_VALUE"
    in tf.train.load_checkpoint(version_files.variables_prefix(version_path)).get_variable_to_shape_map()
  )
  before, recall_v1 = _served_and_recall(version_path, queries)
  delta = _delta(source, before, 5, set(refresh_state.read_state(version_path).ids))
  report = refresh.Refresher(base_path, keep_versions=None, verify_recall=False).apply(delta)
  assert report["graph"] == "version 1's"
  served, recall = _served_and_recall(report["path"], queries)
  assert recall >= recall_v1 - 0.03
  # The served catalog is the delta's: no removed or paused ad, and the new and changed ads that exact
  # search ranks in a query's top K are found. (Whether one given new ad ranks there at all depends on
  # the trained towers, so no single ad is asserted.)
  exact = _served_and_recall.last_exact
  pairs = [(q, ad_id) for q in range(len(exact)) for ad_id in exact[q] if ad_id in delta.upserts]
  found = np.mean([ad_id in served[q] for q, ad_id in pairs])
  assert len(pairs) >= 10 and found >= 0.5  # 0.87-0.97 over 4 training seeds of the test run.
  assert not {before[0, 1], before[0, 2]} & set(served.ravel())


def test_other_search_knobs_trace_the_serving_functions_anew(exported, served_v1, base_path):
  version_path, source, queries = exported
  before, recall_v1 = served_v1
  delta = _delta(source, before, 4, set(refresh_state.read_state(version_path).ids))
  config = version_report.read(version_path).index_config
  # Another value in range: the tuning may have picked every leaf, and above num_leaves is refused.
  leaves = config["leaves_to_search"] + 2
  if leaves > config["num_leaves"]:
    leaves = config["leaves_to_search"] - 2
  report = refresh.Refresher(
    base_path, keep_versions=None, verify_recall=False, index_overrides={"leaves_to_search": leaves}
  ).apply(delta)
  assert report["index_update"] == "incremental" and report["index_config"]["leaves_to_search"] == leaves
  assert report["graph"] == "traced" and "leaves_to_search" in report["graph_traced_because"]
  old_checkpoint = tf.train.load_checkpoint(version_files.variables_prefix(version_path))
  new_checkpoint = tf.train.load_checkpoint(version_files.variables_prefix(report["path"]))
  tower_keys = [
    key
    for key in old_checkpoint.get_variable_to_shape_map()
    if key.startswith(("query_tower/", "item_tower/")) and key.endswith("VARIABLE_VALUE")
  ]
  assert len(tower_keys) > 5
  for key in tower_keys:  # RestoredTower keeps the restored tower object as `owner`.
    new_key = key.replace("_tower/", "_tower/owner/", 1)
    np.testing.assert_array_equal(old_checkpoint.get_tensor(key), new_checkpoint.get_tensor(new_key))
  _, recall = _served_and_recall(report["path"], queries)
  assert recall >= recall_v1 - 0.05


def test_retrains_past_the_threshold_or_on_structural_overrides(exported, served_v1, base_path):
  version_path, source, queries = exported
  before, recall_v1 = served_v1
  refresher = refresh.Refresher(base_path, keep_versions=None, retrain_fraction=0.05, verify_recall=False)
  first = refresher.apply(_delta(source, before, 2, set(refresh_state.read_state(version_path).ids)))
  assert first["index_update"] == "incremental"  # 101 of 3,050 rows.
  # A status change keeps the count; the next 101 rows take it past 5% of the catalog: a full build.
  status = refresher.apply(refresh_delta.parse_lines([json.dumps({"ad_id": before[1, 0], "status": "paused"})]))
  assert status["kind"] == "status_only" and status["index_config"]["rows_encoded_since_training"] == 101
  second, _ = _served_and_recall(status["path"], queries)
  report = refresher.apply(_delta(source, second, 3, set(refresh_state.read_state(status["path"]).ids)))
  assert (
    report["index_update"] == "full"
    and "rows encoded since the last training" in report["index_config"]["full_build_reason"]
  )
  assert report["index_config"]["rows_encoded_since_training"] == 0
  served, recall = _served_and_recall(report["path"], queries)
  assert recall >= recall_v1 - 0.1
  # Overriding what the index trains (here the number of leaves) needs a full build too.
  overridden = refresh.Refresher(base_path, keep_versions=None, index_overrides={"num_leaves": 20}, verify_recall=False)
  report = overridden.apply(refresh_delta.parse_lines([json.dumps({"ad_id": before[2, 0], "deleted": True})]))
  assert report["index_update"] == "full" and "num_leaves" in report["index_config"]["full_build_reason"]
  # So does another partitioning; "auto" keeps the one the version picked (spherical: the towers normalise).
  assert report["index_config"]["partitioning"] == "spherical"
  for partitioning, update in (("auto", "incremental"), ("generic", "full")):
    changed = refresh.Refresher(
      base_path, keep_versions=None, index_overrides={"partitioning": partitioning}, verify_recall=False
    )
    ad_id = sorted(refresh_state.read_state(report["path"]).ids)[0]
    report = changed.apply(refresh_delta.parse_lines([json.dumps({"ad_id": ad_id, "deleted": True})]))
    assert report["index_update"] == update, report["index_config"].get("full_build_reason")
  assert "partitioning" in report["index_config"]["full_build_reason"]
  with pytest.raises(ValueError, match="index_update"):
    refresh.Refresher(base_path, index_update="sometimes")


def test_an_unknown_index_override_is_refused_before_anything_is_published(exported, served_v1, base_path, tmp_path):
  before, _ = served_v1
  removal = refresh_delta.parse_lines([json.dumps({"ad_id": before[2, 0], "deleted": True})])
  typo = refresh.Refresher(base_path, keep_versions=None, index_overrides={"foo": 1}, verify_recall=False)
  # The incremental path builds nothing, so it used to publish, saving "foo" for every later rebuild.
  with pytest.raises(ValueError, match=r"Unknown ScaNN options \['foo'\]"):
    typo.apply(removal)
  assert os.listdir(base_path) == ["1"]
  with pytest.raises(ValueError, match=r"Unknown ScaNN options \['foo'\]"):
    typo.check_index_overrides()
  refresh.Refresher(base_path, index_overrides={"training_sample_size": 2000}).check_index_overrides()
  # fgr-refresh says so as a usage error, before reading the delta.
  delta_file = tmp_path / "delta.jsonl"
  delta_file.write_text(json.dumps({"ad_id": before[2, 0], "deleted": True}) + "\n")
  repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "export.refresh_cli",
      f"--model_base_path={base_path}",
      f"--delta={delta_file}",
      "--index_options=foo=1",
    ],
    cwd=repo_root,
    env={**os.environ, "PYTHONPATH": repo_root},
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 1 and "--index_options: Unknown ScaNN options ['foo']" in result.stderr
  assert os.listdir(base_path) == ["1"]
  # Backends without a ScaNN config take the options their builder names.
  base.backend("brute_force").check_options({"dtype": "float32"})
  with pytest.raises(ValueError, match=r"Unknown brute_force options \['foo'\]"):
    base.backend("brute_force").check_options({"foo": 1})


def test_background_retrain_maps_later_versions_onto_the_new_training(exported, served_v1, base_path, tmp_path):
  version_path, source, queries = exported
  before, recall_v1 = served_v1
  v1 = scann_update.ScannAssets.from_checkpoint(
    version_files.variables_prefix(version_path), refresh_state.read_state(version_path).embeddings
  )
  refresher = refresh.Refresher(
    base_path, keep_versions=None, retrain_fraction=0.02, background_retrain=True, verify_recall=False
  )
  # Past 2% of the catalog, no retrain on the publish path: an update, and a retrain in the background.
  report = refresher.apply(_delta(source, before, 4, set(refresh_state.read_state(version_path).ids)))
  assert report["index_update"] == "incremental" and report["background_retrain_started"]
  assert refresher.wait_for_retrain(120)
  # Versions published meanwhile (a status change, a rebuild) are mapped onto the retrain's snapshot.
  paused = refresher.apply(refresh_delta.parse_lines([json.dumps({"ad_id": before[1, 0], "status": "paused"})]))
  served, _ = _served_and_recall(paused["path"], queries)
  delta = _delta(source, served, 5, set(refresh_state.read_state(paused["path"]).ids))
  report = refresher.apply(delta)
  config = report["index_config"]
  assert report["index_update"] == "retrained" and config["retrained_from"] == 2
  assert config["rows_encoded_since_training"] == config["encoded_rows"] == len(delta.upserts)
  new = scann_update.ScannAssets.from_checkpoint(
    version_files.variables_prefix(report["path"]), refresh_state.read_state(report["path"]).embeddings
  )
  assert new.serialized_partitioner.tolist() != v1.serialized_partitioner.tolist()
  served, recall = _served_and_recall(report["path"], queries)
  assert recall >= recall_v1 - 0.1 and before[1, 0] not in served
  assert not {served_id for served_id in served.ravel()} & {ad_id for ad_id in delta.removals}
  # That rebuild went past 2% again; an idle watch poll publishes the next retrain without a delta.
  assert report["background_retrain_started"] and refresher.wait_for_retrain(120)
  idle = tmp_path / "deltas"
  idle.mkdir()
  polled = refresh_watch.poll_once(refresher, str(idle)).report
  assert polled["index_update"] == "retrained" and polled["delta"] == {}, polled["index_config"].get(
    "full_build_reason"
  )
  assert polled["index_config"]["rows_encoded_since_training"] == 0 and polled["num_items"] == report["num_items"]
  served, recall = _served_and_recall(polled["path"], queries)
  assert recall >= recall_v1 - 0.1 and before[1, 0] not in served
  assert refresh_watch.poll_once(refresher, str(idle)).report is None  # Nothing more to publish.


def test_index_options_keep_how_a_version_from_before_an_option_was_built():
  options, config = {"num_leaves": 30}, {"leaves_to_search": 5, "reorder": 80, "tuned_recall": 0.97}
  # Such a version's graph returns every reordered candidate: a rebuild keeps that, and so its graph.
  # It also predates the partitioning option: it was partitioned with generic k-means.
  assert scann_backend.BACKEND.rebuild_options(options, config, K) == {
    "num_leaves": 30,
    "leaves_to_search": 5,
    "reorder": 80,
    "final_candidates": 80,
    "partitioning": "generic",
  }
  after = scann_backend.BACKEND.rebuild_options(
    options, {**config, "final_candidates": 40, "partitioning": "spherical"}, K
  )
  assert after["final_candidates"] == 40
  assert after["partitioning"] == "spherical"
