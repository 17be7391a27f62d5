"""Benchmark: one full-graph Predict vs the usual pipeline of two calls, at equal offered load.

  python -m bench.serving_pipeline --run_dir=runs/ads --base_path=models/ads --qps=50,150

(a) one `Predict` on `serving_default` of fgr-serve: raw features in, top-k ids out;
(b) `Predict` on `encode_query` of the same fgr-serve (same towers), then `Predict` on a separate ANN
    service (bench/serving_scann_service.py: ScaNN's Python searcher over the same item embeddings with
    the same ScaNN configuration, behind its own gRPC endpoint).
Both are driven open-loop by fgr-loadtest's driver with the same queries; latency counts from each
request's intended send time. Each point runs in short rounds, alternating the variants' order, and
pools them, so the shared machine's background load falls on both alike.
"""

from __future__ import annotations

import grpc
import numpy as np
import tensorflow as tf
from absl import app, flags
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench import serving_common as common
from bench.fixtures import servers
from clients.loadtest import driver

FLAGS = flags.FLAGS
common.define_flags(warmup_seconds=1.0, seconds=5.0, rounds=4)
flags.adopt_module_key_flags(common)
flags.DEFINE_list("qps", ["50", "150"], "Offered loads (requests/s), each run for both variants.")

MODEL = "retrieval"


class TwoCallTarget:
  """encode_query on the model server, then the ANN service with the returned embedding."""

  def __init__(self, model_address: str, ann_address: str, timeout: float = 10.0):
    self.name = f"two calls: grpc://{model_address} encode_query -> grpc://{ann_address}"
    self._model = driver.GrpcPredictTarget(model_address, timeout)
    self._ann_address, self._timeout = ann_address, timeout
    self._channel: grpc.aio.Channel | None = None

  async def open(self) -> None:
    await self._model.open()
    self._channel = grpc.aio.insecure_channel(self._ann_address)
    self._ann = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

  async def call(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    embedding = await self._model.call(request)
    ann_request = predict_pb2.PredictRequest()
    ann_request.model_spec.name = "ann"
    ann_request.inputs["embedding"].CopyFrom(embedding.outputs["embedding"])
    return await self._ann.Predict(ann_request, timeout=self._timeout)

  async def close(self) -> None:
    await self._model.close()
    await self._channel.close()


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
      ann_request = predict_pb2.PredictRequest()
      ann_request.inputs["embedding"].CopyFrom(model.Predict(encode_request, timeout=30).outputs["embedding"])
      other = set(tf.make_ndarray(ann.Predict(ann_request, timeout=30).outputs["ids"])[0])
      shares.append(len(ids & other) / max(len(ids), 1))
  return float(np.mean(shares))


def main(argv: list[str]) -> None:
  del argv
  version = common.latest_version(FLAGS.base_path)
  full = common.query_requests(FLAGS.run_dir, FLAGS.num_queries, MODEL)
  encode = common.query_requests(FLAGS.run_dir, FLAGS.num_queries, MODEL, "encode_query")
  points, ratios = [], []
  workdir = common.workdir(FLAGS.output_dir, "serving_pipeline")
  with (
    servers.fgr_serve(workdir, MODEL, FLAGS.base_path) as model,
    servers.server("bench.serving_scann_service", [f"--version_path={version}"], workdir, "ann") as ann,
  ):
    agreement = overlap(model.address, ann.address, full[:50], encode[:50])
    print(f"top-k overlap between the variants over 50 queries: {agreement:.3f}")
    for qps in (float(q) for q in FLAGS.qps):
      spec = common.open_loop(qps)
      a, b = common.compare(
        [
          common.Variant(
            "(a) full graph, one call", lambda: driver.GrpcPredictTarget(model.address), full, servers=(model, ann)
          ),
          common.Variant(
            "(b) encode_query + ScaNN service",
            lambda: TwoCallTarget(model.address, ann.address),
            encode,
            servers=(model, ann),
          ),
        ],
        spec,
        FLAGS.rounds,
      )
      points += [a, b]
      ratios.append(
        {"qps": qps, "p50_ratio": round(a["p50_ms"] / b["p50_ms"], 3), "p99_ratio": round(a["p99_ms"] / b["p99_ms"], 3)}
      )
      print(
        f"  at {qps:g} QPS: full/two-call p50 {ratios[-1]['p50_ratio']}, p99 {ratios[-1]['p99_ratio']} "
        "(target p50 <= 0.6)"
      )
  common.finish(
    FLAGS.output_dir,
    "serving_pipeline",
    {"version": version, "top_k_overlap": agreement, "points": points, "ratios": ratios},
    points,
    ratios,
  )


if __name__ == "__main__":
  app.run(main)
