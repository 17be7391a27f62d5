"""An index-only SavedModel of an exported version: its ANN search as a model server of its own.

  python -m bench.ann_export --version_path=models/ads/1 --base_path=/tmp/ann_model

The usual alternative to the full graph is two services: one encodes the query, another searches the
catalog. To compare the two with both hops served by fgr-serve (natively or not), the search hop is
this SavedModel: the version's index, item ids and paused-ad mask, behind a `serving_default` that
takes `embedding` [B, d] float32 and answers `ids` [B, k] and `scores` [B, k], as the full graph's does
(and as bench/serving_scann_service.py's Python ANN service does).

Nothing is trained or tuned anew: the index is the version's own, rebuilt from its checkpoint as a
refresh with no changed rows rebuilds it (`export.refresh_policy.rebuild_index`: for ScaNN its trained
partitioner, codebook, codes and tuned knobs), and `engine.full_graph.FullGraph` serves it with the
identity as its query tower. Given the embedding `encode_query` returns, it answers what the full
graph's search does.
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf
from absl import flags, logging

from cli import launch
from engine import full_graph
from export import refresh_policy, refresh_state, version_report, versions, warmup

EMBEDDING = "embedding"
NUM_WARMUP_REQUESTS = 20


def _identity(features: dict[str, tf.Tensor]) -> tf.Tensor:
  """The towers of the index-only graph: its input is already an embedding."""
  return features[EMBEDDING]


def index_only_graph(version_path: str) -> tuple[full_graph.FullGraph, refresh_state.CatalogState]:
  """The version's index and item ids in a FullGraph whose towers are the identity on `embedding`.

  Returns:
    (the graph, the version's catalog).
  """
  base_path, version = os.path.split(os.path.normpath(version_path))
  source = refresh_state.Source.read(base_path, int(version))
  state = source.state
  # Every row maps to itself: an update with nothing to encode, from the version's own training.
  index = refresh_policy.rebuild_index(
    source,
    state,
    np.arange(len(state.ids), dtype=np.int64),
    refresh_policy.rebuild_options(source.report),
    retrain_fraction=float("inf"),
  )
  if index.config.get("update") == "full":
    logging.warning("%s: the index was built anew (%s)", version_path, index.config.get("full_build_reason"))
  spec = {EMBEDDING: tf.TensorSpec([None, state.embeddings.shape[1]], tf.float32, name=EMBEDDING)}
  graph = full_graph.FullGraph(_identity, _identity, index, state.ids, source.report.k, spec, spec)
  return graph, state


def export(version_path: str, base_path: str, version: int | None = None) -> version_report.VersionReport:
  """Publishes the index-only graph of `version_path` as BASE/<version> (next free when None).

  Its warm-up records search for a few eligible ads' own embeddings; its report is the source's, with
  `index_only_of` naming the source.
  """
  started = time.perf_counter()
  graph, state = index_only_graph(version_path)
  source_report = version_report.read(version_path)
  with versions.publish(base_path, version) as (temp_path, version):
    graph.save(temp_path)
    rows = np.flatnonzero(state.eligible)[:NUM_WARMUP_REQUESTS]
    requests = []
    for row in rows:
      request = warmup.predict_request({})
      request.inputs[EMBEDDING].CopyFrom(tf.make_tensor_proto(np.asarray(state.embeddings[row : row + 1], np.float32)))
      requests.append(request)
    warmup.write_warmup(temp_path, requests)
    report = version_report.VersionReport(
      version=version,
      path=os.path.join(base_path, str(version)),
      index=source_report.index,
      k=source_report.k,
      index_options=source_report.index_options,
      index_config=dict(graph.index.config),
      num_items=int(len(state.ids)),
      num_eligible=int(state.eligible.sum()),
      index_bytes=graph.index.nbytes(),
      extra={"index_only_of": os.path.abspath(version_path)},
    )
    report.time("export", time.perf_counter() - started)
    version_report.write(temp_path, report)
  logging.info("Index-only version %d of %s written to %s", version, version_path, report.path)
  return report


def main(argv: list[str]) -> None:
  del argv
  report = export(flags.FLAGS.version_path, flags.FLAGS.base_path)
  print(report.path)


if __name__ == "__main__":
  flags.DEFINE_string("version_path", None, "An exported full-graph version.", required=True)
  flags.DEFINE_string("base_path", None, "Model base path to publish the index-only version under.", required=True)
  launch.run_module(main)
