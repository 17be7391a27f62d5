"""A separate ANN service, as users build it today: ScaNN's Python searcher behind its own gRPC endpoint.

It serves the same catalog as an exported full-graph version (its item embeddings, ids and paused-ad
mask from `assets.extra` and the checkpoint) with the same ScaNN configuration the export chose, but
through `scann.scann_ops_pybind` in a plain gRPC server. For transport it reuses TF Serving's
PredictionService: Predict takes `embedding` [B, d] float32 and answers `ids` [B, k] and `scores` [B, k].

  python -m bench.serving_scann_service --port=0 --port_file=/tmp/ann.port --version_path=models/ads/1
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import numpy as np
import scann
import tensorflow as tf
from absl import flags, logging
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench import echo_server
from cli import launch
from export import refresh_state, version_report

FLAGS = flags.FLAGS
flags.DEFINE_integer("port", 0, "gRPC port on 127.0.0.1 (0 picks a free one).")
flags.DEFINE_string("port_file", None, "Writes `grpc=<port>` here once serving.")
flags.DEFINE_string("version_path", None, "An exported full-graph version whose catalog to serve.", required=True)
flags.DEFINE_integer("max_workers", 8, "Server worker threads (fgr-serve's default is the same order).")

EMBEDDING = "embedding"


def build_searcher(version_path: str) -> tuple[object, np.ndarray, int, dict]:
  """ScaNN over the version's eligible items with its export's index configuration.

  Returns:
    (searcher, ids of the indexed rows, k, search keyword arguments).
  """
  export = version_report.read(version_path)
  if export.index != "scann":
    raise ValueError(f"{version_path} was exported with --index={export.index}; this service mirrors scann")
  config, k = export.index_config, export.k
  state = refresh_state.read_state(version_path)
  rows = np.flatnonzero(state.eligible)  # Paused ads are left out instead of masked at search time.
  vectors = np.ascontiguousarray(state.embeddings[rows], dtype=np.float32)
  started = time.perf_counter()
  builder = scann.scann_ops_pybind.builder(vectors, k, "dot_product")
  if config["num_leaves"]:
    builder = builder.tree(
      num_leaves=config["num_leaves"],
      num_leaves_to_search=max(1, config["leaves_to_search"]),
      training_sample_size=min(config["training_sample_size"], len(rows)),
    )
  if config["scoring"] == "ah":
    builder = builder.score_ah(
      config["dimensions_per_block"],
      anisotropic_quantization_threshold=config["anisotropic_quantization_threshold"],
      training_sample_size=min(config["training_sample_size"], len(rows)),
    )
  else:
    builder = builder.score_brute_force()
  if config["reorder"]:
    builder = builder.reorder(config["reorder"])
  searcher = builder.build()
  search_args = {"final_num_neighbors": k}
  if config["reorder"]:
    search_args["pre_reorder_num_neighbors"] = config["reorder"]
  if config["num_leaves"]:
    search_args["leaves_to_search"] = config["leaves_to_search"]
  logging.info(
    "ScaNN over %d eligible of %d items built in %.1f s: %s",
    len(rows),
    len(state.ids),
    time.perf_counter() - started,
    search_args,
  )
  return searcher, np.asarray(state.ids[rows]).astype(bytes), k, search_args


class AnnServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
  """Predict = nearest neighbours of the `embedding` input."""

  def __init__(self, searcher, ids: np.ndarray, search_args: dict):
    self._searcher, self._ids, self._search_args = searcher, ids, search_args

  def Predict(self, request, context):  # pylint: disable=invalid-name
    if EMBEDDING not in request.inputs:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input '{EMBEDDING}' [B, d] float32 is required")
    queries = tf.make_ndarray(request.inputs[EMBEDDING]).astype(np.float32)
    if len(queries) == 1:
      rows, scores = self._searcher.search(queries[0], **self._search_args)
      rows, scores = rows[None], scores[None]
    else:
      rows, scores = self._searcher.search_batched(queries, **self._search_args)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.outputs["ids"].CopyFrom(tf.make_tensor_proto(self._ids[rows]))
    response.outputs["scores"].CopyFrom(tf.make_tensor_proto(np.asarray(scores, dtype=np.float32)))
    return response


def main(argv: list[str]) -> None:
  del argv
  searcher, ids, _, search_args = build_searcher(FLAGS.version_path)
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=FLAGS.max_workers))
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(AnnServicer(searcher, ids, search_args), server)
  port = server.add_insecure_port(f"127.0.0.1:{FLAGS.port}")
  server.start()
  echo_server.serve_until_signalled(server, port, FLAGS.port_file)


if __name__ == "__main__":
  launch.run_module(main)
