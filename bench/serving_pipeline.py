"""Benchmark: one full-graph Predict vs the usual pipeline of two calls, at equal offered load.

  python -m bench.serving_pipeline --run_dir=runs/ads --base_path=models/ads --qps=50,150 --native=on

(a) one `Predict` on `serving_default` of fgr-serve: raw features in, top-k ids out;
(b) `Predict` on `encode_query` of the same fgr-serve (same towers), then `Predict` with the embedding
    on a separate ANN service, one per `--ann`:
    - `fgr_serve`: a second fgr-serve serving the version's own index as an index-only SavedModel
      (bench/ann_export.py: same index, ids and paused-ad mask), so with `--native=on` both hops are
      served natively, as the full graph is;
    - `python`: bench/serving_scann_service.py, ScaNN's Python searcher over the same item embeddings
      with the same ScaNN configuration (trained anew), behind a Python gRPC server.
All are driven open-loop by fgr-loadtest's driver with the same queries; latency counts from each
request's intended send time. Each point runs in short rounds, alternating the variants' order, and
pools them, so the shared machine's background load falls on all alike. Before the load, the variants'
top-k ids are compared over 50 queries: they must find the same ads.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import grpc
import numpy as np
import tensorflow as tf
from absl import app, flags
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench import ann_export
from bench import serving_common as common
from bench.fixtures import servers
from cli import launch
from clients.loadtest import driver

FLAGS = flags.FLAGS
common.define_flags(warmup_seconds=1.0, seconds=5.0, rounds=4)
flags.adopt_module_key_flags(common)
flags.DEFINE_list("qps", ["50", "150"], "Offered loads (requests/s), each run for every variant.")
flags.DEFINE_list(
  "ann",
  ["fgr_serve"],
  "The two-call variants' ANN services, each a variant: fgr_serve (the version's index as an index-only "
  "SavedModel on a second fgr-serve) and/or python (ScaNN's Python searcher behind a Python gRPC server).",
)
flags.DEFINE_enum(
  "native",
  None,
  ["auto", "on", "off"],
  "fgr-serve --native for every fgr-serve here (the full graph's and the ANN's); unset: fgr-serve's default.",
)

MODEL = "retrieval"
ANN_MODEL = "ann"
ANN_SERVICES = {
  "fgr_serve": "encode_query + fgr-serve ANN",
  "python": "encode_query + Python ScaNN",
}


def ann_request(embedding: predict_pb2.PredictResponse) -> predict_pb2.PredictRequest:
  """The ANN service's request for the embedding an `encode_query` Predict answered."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = ANN_MODEL
  request.inputs[ann_export.EMBEDDING].CopyFrom(embedding.outputs[ann_export.EMBEDDING])
  return request


class TwoCallTarget:
  """encode_query on the model server, then the ANN service with the returned embedding."""

  def __init__(self, model_address: str, ann_address: str, timeout: float = 10.0):
    self.name = f"two calls: grpc://{model_address} encode_query -> grpc://{ann_address}"
    self._model = driver.GrpcPredictTarget(model_address, timeout)
    self._ann = driver.GrpcPredictTarget(ann_address, timeout)

  async def open(self) -> None:
    await self._model.open()
    await self._ann.open()

  async def call(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    return await self._ann.call(ann_request(await self._model.call(request)))

  async def close(self) -> None:
    await self._model.close()
    await self._ann.close()


def overlap(model_address: str, ann_address: str, full: list, encode: list) -> float:
  """Mean overlap of the two variants' top-k ids over some queries (both should find the same ads)."""
  with grpc.insecure_channel(model_address) as m, grpc.insecure_channel(ann_address) as a:
    model, ann = (
      prediction_service_pb2_grpc.PredictionServiceStub(m),
      prediction_service_pb2_grpc.PredictionServiceStub(a),
    )
    shares = []
    for full_request, encode_request in zip(full, encode):
      ids = set(tf.make_ndarray(model.Predict(full_request, timeout=30).outputs["ids"])[0])
      request = ann_request(model.Predict(encode_request, timeout=30))
      other = set(tf.make_ndarray(ann.Predict(request, timeout=30).outputs["ids"])[0])
      shares.append(len(ids & other) / max(len(ids), 1))
  return float(np.mean(shares))


def ann_server(
  kind: str, version: str, workdir: str, serve_args: list[str]
) -> contextlib.AbstractContextManager[servers.ServerProcess]:
  """The ANN service `kind` (see ANN_SERVICES) over the version's catalog, started in its own process."""
  if kind == "python":
    return servers.server("bench.serving_scann_service", [f"--version_path={version}"], workdir, "ann-python")
  base_path = os.path.join(workdir, "ann_model")
  shutil.rmtree(base_path, ignore_errors=True)  # A previous run's, maybe of another version.
  ann_export.export(version, base_path)
  return servers.fgr_serve(workdir, ANN_MODEL, base_path, serve_args, name="fgr-serve-ann")


def main(argv: list[str]) -> None:
  del argv
  unknown = sorted(set(FLAGS.ann) - set(ANN_SERVICES))
  if unknown or not FLAGS.ann:
    raise app.UsageError(f"--ann takes one or more of {sorted(ANN_SERVICES)}, got {FLAGS.ann}")
  version = common.latest_version(FLAGS.base_path)
  full = common.query_requests(FLAGS.run_dir, FLAGS.num_queries, MODEL)
  encode = common.query_requests(FLAGS.run_dir, FLAGS.num_queries, MODEL, "encode_query")
  serve_args = [] if FLAGS.native is None else [f"--native={FLAGS.native}"]
  points, ratios, agreement = [], [], {}
  workdir = common.workdir(FLAGS.output_dir, "serving_pipeline")
  with contextlib.ExitStack() as stack:
    model = stack.enter_context(servers.fgr_serve(workdir, MODEL, FLAGS.base_path, serve_args))
    anns = {kind: stack.enter_context(ann_server(kind, version, workdir, serve_args)) for kind in FLAGS.ann}
    for kind, ann in anns.items():
      agreement[kind] = overlap(model.address, ann.address, full[:50], encode[:50])
      print(f"top-k overlap of the full graph and {ANN_SERVICES[kind]} over 50 queries: {agreement[kind]:.3f}")
    variants = [
      common.Variant("(a) full graph, one call", lambda: driver.GrpcPredictTarget(model.address), full, (model,))
    ]
    for letter, (kind, ann) in zip("bcd", anns.items()):
      variants.append(
        common.Variant(
          f"({letter}) {ANN_SERVICES[kind]}",
          lambda ann=ann: TwoCallTarget(model.address, ann.address),
          encode,
          (model, ann),
        )
      )
    for qps in (float(q) for q in FLAGS.qps):
      measured = common.compare(variants, common.open_loop(qps), FLAGS.rounds)
      points += measured
      a = measured[0]
      for kind, b in zip(anns, measured[1:]):
        ratios.append(
          {
            "qps": qps,
            "ann": kind,
            "p50_ratio": round(a["p50_ms"] / b["p50_ms"], 3),
            "p99_ratio": round(a["p99_ms"] / b["p99_ms"], 3),
          }
        )
        print(
          f"  at {qps:g} QPS: full / ({ANN_SERVICES[kind]}) p50 {ratios[-1]['p50_ratio']}, "
          f"p99 {ratios[-1]['p99_ratio']} (target p50 <= 0.6)"
        )
  common.finish(
    FLAGS.output_dir,
    "serving_pipeline",
    {
      "version": version,
      "native": FLAGS.native,
      "ann": FLAGS.ann,
      "top_k_overlap": agreement,
      "points": points,
      "ratios": ratios,
    },
    points,
    ratios,
  )


if __name__ == "__main__":
  launch.run_module(main)
