"""Export round trip: the loaded SavedModel returns what the in-process model and index return."""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from engine import base, search_ops
from export import exporter, refresh_publish, served_evaluation, version_files, version_report, versions, warmup
from models import train
from models.data import schema, sources
from serving.core import file_system_source
from tests import topk_testlib
from tests.conftest import BRUTE_FORCE_EXPORT, TINY_DATA, TINY_TOWER, TINY_TRAINING


def _test_queries(run_dir, count=32):
  _, run_config = train.restore(run_dir)
  source = sources.open_source(sources.DataSpec.from_json(run_config["data"]))
  batch = next(source.examples("test"))
  return {name: batch[name][:count] for name in schema.QUERY_FEATURE_NAMES}


@pytest.mark.parametrize("backend", ["brute_force", "scann"])
def test_loaded_saved_model_matches_the_in_process_model(trained_run, tmp_path, backend):
  if backend == "scann":
    import scann  # noqa: F401  Registers ScaNN's ops, as a server must before loading.
  config = exporter.ExportConfig(index=backend, k=20)
  built = exporter.build_graph(trained_run, config)
  report = exporter.publish_graph(built, str(tmp_path), config)
  assert report["version"] == 1 and report["recall_at_20_vs_exact"] >= 0.95
  loaded = tf.saved_model.load(report["path"])
  assert {"serving_default", "encode_query", "encode_item"} <= set(loaded.signatures)

  queries = _test_queries(trained_run)
  tensors = {name: tf.constant(values) for name, values in queries.items()}
  served = loaded.signatures["serving_default"](**tensors)
  assert served["ids"].shape == (32, 20) and served["scores"].dtype == tf.float32
  expected = built.graph.retrieve(tensors)
  # The loaded graph runs the towers and the search with other rewrites (and rounding) than the
  # in-process model: the same answers up to ties. At 3k ads either index searches exactly.
  query_embeddings = built.graph.query_tower(tensors).numpy()
  scores = topk_testlib.reference_scores(query_embeddings, built.catalog.embeddings, built.catalog.eligible)
  topk_testlib.assert_top_k_agree(
    topk_testlib.rows_of(served["ids"].numpy(), built.catalog.ids),
    topk_testlib.rows_of(expected["ids"].numpy(), built.catalog.ids),
    scores,
  )
  np.testing.assert_allclose(served["scores"].numpy(), expected["scores"].numpy(), rtol=1e-4, atol=1e-5)
  # Scores come best first, and paused ads never come back.
  assert np.all(np.diff(served["scores"].numpy(), axis=1) <= 1e-6)
  paused = set(built.catalog.ids[~built.catalog.eligible])
  assert paused and not paused & set(served["ids"].numpy().astype(str).ravel())
  # The towers are exported on their own too.
  np.testing.assert_allclose(
    loaded.signatures["encode_query"](**tensors)["embedding"].numpy(),
    built.graph.query_tower(tensors).numpy(),
    rtol=1e-4,
    atol=1e-5,
  )
  # The index agrees with exact search over the same embeddings (the export's own check, redone).
  exact = search_ops.exact_top_k_numpy(query_embeddings, built.catalog.embeddings, 20, eligible=built.catalog.eligible)
  row_of = {ad_id: row for row, ad_id in enumerate(built.catalog.ids)}
  served_rows = np.array([[row_of[i] for i in row] for row in served["ids"].numpy().astype(str)])
  assert search_ops.recall_at_k(served_rows, exact) >= 0.95


def test_export_writes_tf_serving_warmup_records(trained_run, brute_force_export, tmp_path):
  # The shared export is export_model's output for BRUTE_FORCE_EXPORT (5 warm-up requests; the recall
  # check's defaults, 500 + 1,000 held-out queries, are other tests' business).
  path = os.path.join(brute_force_export, "assets.extra", warmup.WARMUP_FILE)
  records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
  assert len(records) == BRUTE_FORCE_EXPORT.num_warmup_requests == 5
  request = records[0].predict_log.request
  assert request.model_spec.signature_name == "serving_default"
  assert set(request.inputs) == set(schema.QUERY_FEATURE_NAMES)
  version_files.link_tree(brute_force_export, str(tmp_path / "1"))
  assert exporter.export_model(trained_run, str(tmp_path), BRUTE_FORCE_EXPORT)["version"] == 2


def test_failed_publish_leaves_no_version_behind(tmp_path):
  with pytest.raises(RuntimeError):
    with versions.publish(str(tmp_path)) as (temp_path, version):
      os.makedirs(temp_path)
      with open(os.path.join(temp_path, "saved_model.pb"), "w") as f:
        f.write("half")
      raise RuntimeError("disk full")
  assert os.listdir(tmp_path) == [] and versions.list_versions(str(tmp_path)) == []
  with versions.publish(str(tmp_path)) as (temp_path, version):
    os.makedirs(temp_path)
    open(os.path.join(temp_path, "saved_model.pb"), "w").close()
  assert version == 1 and versions.list_versions(str(tmp_path)) == [1]
  with pytest.raises(FileExistsError):
    with versions.publish(str(tmp_path), version=1):
      pass


@pytest.mark.parametrize("version", [-3, 0, 2**63, 10**20])  # TF Serving's versions are int64s.
def test_a_version_that_tf_serving_would_ignore_is_refused(tmp_path, version):
  with pytest.raises(ValueError, match=rf"version must be a positive integer.*got {version}"):
    exporter.ExportConfig(index="brute_force", version=version)
  with pytest.raises(ValueError, match="positive integer"):
    with versions.publish(str(tmp_path), version=version):
      pass
  assert os.listdir(tmp_path) == []


def test_no_version_is_numbered_past_the_largest_tf_serving_loads(tmp_path):
  """After BASE/9223372036854775807, the next export was numbered 2**63, which no server loads."""
  os.makedirs(tmp_path / str(versions.MAX_VERSION))
  with pytest.raises(ValueError, match=rf"holds version {versions.MAX_VERSION}, the largest TF Serving loads"):
    with versions.publish(str(tmp_path)):
      pass
  assert os.listdir(tmp_path) == [str(versions.MAX_VERSION)]


@pytest.mark.parametrize("k", [0, -5])
def test_a_k_below_one_is_refused_with_the_config(k):
  """--k=-5 ended in a TopKV2 traceback after the whole build."""
  with pytest.raises(ValueError, match=rf"^k must be at least 1 \(the candidates returned per request\), got {k}$"):
    exporter.ExportConfig(index="brute_force", k=k)


@pytest.mark.parametrize("backend", base.available_backends())
def test_a_k_above_the_catalog_is_refused_before_the_catalog_is_embedded(trained_run, monkeypatch, backend):
  """Each backend failed its own way (brute_force: "kth(=99999) out of bounds"), and only after the build."""

  def must_not_run(*args, **kwargs):
    raise AssertionError("the catalog was embedded or indexed before k was checked")

  monkeypatch.setattr(exporter.catalog_lib, "embed_catalog", must_not_run)
  monkeypatch.setattr(exporter.base, "build_index", must_not_run)
  num_ads = TINY_DATA.synthetic["num_ads"]
  config = exporter.ExportConfig(index=backend, k=num_ads + 1, eval_queries=10, tuning_queries=0)
  with pytest.raises(ValueError, match=rf"^k must be in \[1, {num_ads}\] \(the catalog size\), got {num_ads + 1}$"):
    exporter.build_graph(trained_run, config)


def test_only_names_tf_serving_parses_count_as_versions(tmp_path):
  # TF Serving reads int64s in ASCII digits: "²" and "٣" pass str.isdigit, and are no versions.
  for name in ("2", "²", "٣", str(2**63), "x"):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "saved_model.pb").write_bytes(b"")
  assert versions.list_versions(str(tmp_path)) == [2]
  with versions.publish(str(tmp_path)) as (temp_path, version):
    os.makedirs(temp_path)
    open(os.path.join(temp_path, "saved_model.pb"), "wb").close()
  assert version == 3 and versions.list_versions(str(tmp_path)) == [2, 3]
  assert sorted(file_system_source.list_versions(str(tmp_path))) == [2, 3]  # What fgr-serve loads.


def test_mixed_precision_export_keeps_float32_outputs(trained_run, tmp_path):
  report = exporter.export_model(
    trained_run,
    str(tmp_path),
    exporter.ExportConfig(index="brute_force", k=10, precision="mixed_bfloat16", eval_queries=50, tuning_queries=0),
  )
  assert report["precision"] == "mixed_bfloat16" and report["jit_compile"] is False
  # Exact search over the bfloat16 towers' own outputs, against NumPy's: equal up to ties at the 10th
  # place, which TF and NumPy may break differently (5 of the 500 ids may differ).
  assert report["recall_at_10_vs_exact"] >= 0.99
  loaded = tf.saved_model.load(report["path"])
  tensors = {name: tf.constant(values) for name, values in _test_queries(trained_run, 4).items()}
  served = loaded.signatures["serving_default"](**tensors)
  assert served["scores"].dtype == tf.float32
  assert loaded.signatures["encode_query"](**tensors)["embedding"].dtype == tf.float32


def test_sequence_encoder_towers_export_and_serve(tmp_path):
  run_dir = str(tmp_path / "run")
  tower = dataclasses.replace(TINY_TOWER, sequence_encoder="self_attention", attention_target="query_and_latest")
  # What is checked is the round trip of the encoder, not its quality: a third of TINY_DATA's log,
  # still a few training steps of 256 and more held-out queries than the export evaluates.
  data = dataclasses.replace(TINY_DATA, synthetic={**TINY_DATA.synthetic, "num_ads": 1000, "num_sessions": 1500})
  train.train(data, tower, TINY_TRAINING, run_dir)
  config = exporter.ExportConfig(index="brute_force", k=10, eval_queries=50, tuning_queries=0)
  built = exporter.build_graph(run_dir, config)
  loaded = tf.saved_model.load(exporter.publish_graph(built, str(tmp_path / "export"), config)["path"])
  queries = _test_queries(run_dir, 8)
  queries[schema.QUERY_TOKENS] = np.full_like(queries[schema.QUERY_TOKENS], schema.PAD)  # No query: a feed.
  tensors = {name: tf.constant(values) for name, values in queries.items()}
  np.testing.assert_allclose(
    loaded.signatures["encode_query"](**tensors)["embedding"].numpy(),
    built.graph.query_tower(tensors).numpy(),
    rtol=1e-4,
    atol=1e-5,
  )
  served = loaded.signatures["serving_default"](**tensors)
  np.testing.assert_allclose(
    served["scores"].numpy(), built.graph.retrieve(tensors)["scores"].numpy(), rtol=1e-4, atol=1e-5
  )
  # A served history longer than the encoder's positions is cut to its most recent max_history.
  long = {
    name: tf.constant(np.tile(values, [1, 4]))
    for name, values in queries.items()
    if name in (schema.HIST_IDS, schema.HIST_CATEGORIES, schema.HIST_BRANDS)
  }
  assert long[schema.HIST_IDS].shape[1] > tower.max_history
  out = loaded.signatures["serving_default"](**{**tensors, **long})
  assert out["ids"].shape == (8, 10) and np.all(np.isfinite(out["scores"].numpy()))


def test_exclude_history_export_never_serves_the_request_history(trained_run, tmp_path):
  config = exporter.ExportConfig(
    index="brute_force", k=10, exclude_history=True, exclusion_depth=30, eval_queries=50, tuning_queries=0
  )
  report = exporter.export_model(trained_run, str(tmp_path), config)
  assert report["exclusions"] == schema.HIST_IDS and report["exclusion_depth"] == 30
  serve = tf.saved_model.load(report["path"]).signatures["serving_default"]
  queries = _test_queries(trained_run, 8)
  first = serve(**{name: tf.constant(values) for name, values in queries.items()})["ids"].numpy().astype(str)
  # The same requests, now with their 5 best answers in front of their history: 30 spare candidates
  # cover every id a history of 25 can name, so each still gets k.
  history = np.concatenate([first[:, :5], queries[schema.HIST_IDS]], axis=1).astype(object)
  assert history.shape[1] <= 30
  queries = {**queries, schema.HIST_IDS: history}
  served = serve(**{name: tf.constant(values) for name, values in queries.items()})["ids"].numpy().astype(str)
  for answer, named in zip(served, history):
    assert "" not in answer and not {x for x in named if x} & set(answer)
  # A refresh's version reports (and so rebuilds with) the same exclusions.
  source_report = version_report.read(report["path"])
  refreshed = refresh_publish.refreshed_report(
    source_report, 1, 2, str(tmp_path), "rebuild", np.asarray(["a"]), np.ones([1], bool)
  )
  assert (refreshed.exclusions, refreshed.exclusion_depth) == (schema.HIST_IDS, 30)
  # fgr-eval --model_path judges the version's own answers, beside baselines without the history too.
  evaluated = served_evaluation.evaluate_full_graph(
    report["path"], sources.open_source(TINY_DATA), max_examples=64, batch_size=32
  )
  assert evaluated["num_examples"] == 64 and evaluated["exclusions"] == schema.HIST_IDS
  assert set(evaluated["ranking"]) == {"recall@10", "hit_rate@10", "ndcg@10"}
  assert set(evaluated["baselines"]) == {"popularity", "item_cooccurrence"}
  for judged in (evaluated, *evaluated["baselines"].values()):
    assert 0 <= judged["ranking"]["ndcg@10"] <= judged["ranking"]["recall@10"] <= 1
    assert judged["water_level"]["click_coverage"] == pytest.approx(judged["ranking"]["recall@10"])
  # fgr-eval --ks: cut-offs up to the version's k, no further (its lists hold k answers).
  at = served_evaluation.evaluate_full_graph(
    report["path"], sources.open_source(TINY_DATA), max_examples=32, batch_size=32, with_baselines=False, ks=(1, 5)
  )
  assert set(at["ranking"]) == {f"{m}@{k}" for m in ("recall", "hit_rate", "ndcg") for k in (1, 5)}
  with pytest.raises(ValueError, match="serves 10 candidates per request: it can't be judged at K=50"):
    served_evaluation.evaluate_full_graph(report["path"], sources.open_source(TINY_DATA), ks=(10, 50))


def test_served_ids_the_data_does_not_know_count_as_misses():
  """A refreshed version serves ads added after the data was written: fgr-eval --model_path judges them
  as recalled items no test example clicked (it raised KeyError)."""

  class Source:
    def row_of(self, ad_id: str) -> int:
      return {"a": 0, "b": 1}[ad_id]

  ids = tf.constant([["b", "new-ad", "a"], ["a", "", ""]])
  assert served_evaluation._rows(ids, Source()).tolist() == [[1, -1, 0], [0, -1, -1]]
