"""Helpers for serving tests of a tree-AH ScaNN full-graph export: the export, queries, requests, and
NumPy references to check answers against.

The test catalogs have 3,000 ads, far below the 100k from which ScaNN's rules of thumb build a tree,
so the export forces one through its build options (`num_leaves`, `scoring="ah"`): the served search
then goes through the tree, AH scoring, the exact reordering, the retry with every reordered candidate
and the exact fallback, as a production catalog's does.
"""

import os

import numpy as np
import tensorflow as tf

from engine import full_graph, search_ops
from export import exporter, refresh_publish, refresh_state, version_files, warmup
from models import config as config_lib
from models.data import queries as queries_lib
from models.data import sources

K = 10
NUM_LEAVES = 30
# 6 of 30 leaves and 200 reordered candidates, of which the best 2k = 20 are kept for the eligibility
# filter: a query whose 20 best candidates hold fewer than 10 eligible ads searches again with all 200.
TREE_OPTIONS = {"num_leaves": NUM_LEAVES, "scoring": "ah", "leaves_to_search": 6, "reorder": 200}


def export_tree(trained_run: str, base_path: str) -> str:
  """Exports a tree-AH ScaNN full graph of `trained_run` as BASE/1; returns that version's path.

  The session fixture `tree_export` (tests/conftest.py) makes it once for every test. Tests that serve
  it copy it (`copy_version`) rather than serve or refresh it in place.
  """
  report = exporter.export_model(
    trained_run,
    base_path,
    exporter.ExportConfig(
      index="scann", k=K, index_options=dict(TREE_OPTIONS), num_warmup_requests=2, eval_queries=20, tuning_queries=0
    ),
  )
  config = report["index_config"]
  assert (config["scoring"], config["num_leaves"], config["final_candidates"]) == ("ah", NUM_LEAVES, 2 * K), config
  return report["path"]


def copy_version(version_dir: str, base_path: str, version: int = 1) -> str:
  """Copies a version directory to BASE/<version> (hard links: versions are never modified)."""
  destination = os.path.join(base_path, str(version))
  os.makedirs(base_path, exist_ok=True)
  version_files.link_tree(version_dir, destination)
  return destination


def publish_eligible(source_dir: str, base_path: str, eligible: np.ndarray) -> str:
  """Publishes `source_dir`'s graph and index with another eligibility mask as BASE's next version."""
  source_base, version = os.path.split(source_dir.rstrip("/"))
  source = refresh_state.Source.read(source_base, int(version))
  return refresh_publish.publish_status_only(base_path, source, eligible).path


def held_out_queries(trained_run: str, count: int) -> dict[str, np.ndarray]:
  """Query features of `count` held-out examples of the run's data, [count, ...] per feature."""
  run_config = config_lib.read_run_config(trained_run)
  source = sources.open_source(sources.DataSpec.from_json(run_config["data"]))
  return queries_lib.held_out_queries(source, count)


def item_features(trained_run: str, rows: np.ndarray) -> dict[str, np.ndarray]:
  """Item features (ad_id, category, brand, ad_tokens) of catalog rows of the run's data."""
  run_config = config_lib.read_run_config(trained_run)
  return sources.open_source(sources.DataSpec.from_json(run_config["data"])).features(np.asarray(rows))


def request(features: dict[str, np.ndarray], model_name: str, signature_name: str = "serving_default", **knobs: int):
  """A PredictRequest for a batch of query features, with int32 scalar search knobs."""
  message = warmup.predict_request(features, signature_name, model_name)
  for name, value in knobs.items():
    message.inputs[name].CopyFrom(tf.make_tensor_proto(value, tf.int32))
  return message


def ids_and_scores(response) -> tuple[np.ndarray, np.ndarray]:
  """str [B, k] ids and float32 [B, k] scores of a full-graph Predict response."""
  ids = tf.make_ndarray(response.outputs["ids"]).astype(str)
  return ids, tf.make_ndarray(response.outputs["scores"])


def query_embeddings(stub, model_name: str, features: dict[str, np.ndarray]) -> np.ndarray:
  """float32 [B, d] query embeddings, from the served model's own encode_query signature."""
  response = stub.Predict(request(features, model_name, full_graph.ENCODE_QUERY), timeout=60)
  return tf.make_ndarray(response.outputs["embedding"])


def catalog(version_dir: str) -> refresh_state.CatalogState:
  """A served version's ids, embeddings and eligibility mask."""
  return refresh_state.read_state(version_dir)


def exact_ids(queries: np.ndarray, state: refresh_state.CatalogState, k: int = K) -> np.ndarray:
  """str [Q, k] ids of the exact top-k eligible ads by dot product (NumPy)."""
  rows = search_ops.exact_top_k_numpy(queries, np.asarray(state.embeddings), k, eligible=state.eligible)
  return np.asarray(state.ids)[rows].astype(str)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean share of each row of `truth` (str ids) found in the same row of `found`, as sets."""
  return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def dot_scores(queries: np.ndarray, ids: np.ndarray, state: refresh_state.CatalogState) -> np.ndarray:
  """float32 [Q, k] exact dot products of each query with the ads `ids` [Q, k] name."""
  row_of = state.row_of()
  rows = np.vectorize(row_of.__getitem__, otypes=[np.int64])(ids)
  return np.einsum("qd,qkd->qk", queries, np.asarray(state.embeddings)[rows])
