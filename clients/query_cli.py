"""fgr-query: sends raw query features to a TF Serving-compatible server and prints the candidates.

It speaks plain TF Serving gRPC (PredictionService.Predict), so it works against fgr-serve and against
stock TF Serving alike. Features come from flags (one request) or from a JSONL file (one request per
line, each a JSON object of feature name to a string or a list of strings).
"""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import tensorflow as tf
from absl import app, flags
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from clients.loadtest import request_source

FLAGS = flags.FLAGS

flags.DEFINE_string("server", "127.0.0.1:8500", "host:port of the gRPC endpoint.")
flags.DEFINE_string("model_name", "retrieval", "Model name on the server.")
flags.DEFINE_integer("model_version", None, "Version to query; the server's choice when unset.")
flags.DEFINE_string("signature_name", "serving_default", "Signature to call.")
flags.DEFINE_string("user_id", "", "The user's id.")
flags.DEFINE_list("user_features", [], "Profile tokens, e.g. age:25-34,gender:f.")
flags.DEFINE_string("query", "", "Query tokens separated by spaces.")
flags.DEFINE_list("history", [], "Recently clicked ad ids, most recent first.")
flags.DEFINE_list("history_categories", [], "Categories of those ads (same order).")
flags.DEFINE_list("history_brands", [], "Brands of those ads (same order).")
flags.DEFINE_string(
  "requests_file", None, "JSONL of requests (feature name -> string or list); overrides the feature flags."
)
flags.DEFINE_integer(
  "num_requests",
  1,
  "Requests to send (cycling through the requests); with more than one, latency percentiles are printed.",
)
flags.DEFINE_integer("top", 10, "Candidates to print per request.")
flags.DEFINE_float("timeout", 10.0, "Per-request deadline in seconds.")
flags.DEFINE_bool("json", False, "Print one JSON object per answer instead of a table.")


def features_from_flags() -> dict[str, list]:
  """One request's features from the feature flags, in the padded layout the model expects."""
  return {
    "user_id": FLAGS.user_id,
    "user_features": FLAGS.user_features or [""],
    "query_tokens": FLAGS.query.split() or [""],
    "hist_ids": FLAGS.history or [""],
    "hist_categories": FLAGS.history_categories or [""] * max(len(FLAGS.history), 1),
    "hist_brands": FLAGS.history_brands or [""] * max(len(FLAGS.history), 1),
  }


def read_requests(path: str) -> list[dict[str, object]]:
  """Reads one feature dict per non-empty line of a JSONL file."""
  try:
    requests = request_source.read_feature_lines(path)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if not requests:
    raise app.UsageError(f"{path} holds no requests")
  return requests


def build_request(features: dict[str, object]) -> predict_pb2.PredictRequest:
  """A batch-of-one PredictRequest: scalars become [1] tensors and lists [1, n] tensors."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = FLAGS.model_name
  request.model_spec.signature_name = FLAGS.signature_name
  if FLAGS.model_version is not None:
    request.model_spec.version.value = FLAGS.model_version
  for name, value in features.items():
    array = np.asarray([value], dtype=object)
    request.inputs[name].CopyFrom(tf.make_tensor_proto(array.astype(bytes)))
  return request


def print_answer(number: int, response: predict_pb2.PredictResponse) -> None:
  ids = tf.make_ndarray(response.outputs["ids"])[0][: FLAGS.top]
  scores = tf.make_ndarray(response.outputs["scores"])[0][: FLAGS.top]
  version = response.model_spec.version.value
  if FLAGS.json:
    print(
      json.dumps(
        {
          "request": number,
          "version": version,
          "ids": [i.decode() for i in ids],
          "scores": [round(float(s), 5) for s in scores],
        }
      )
    )
    return
  print(f"request {number} (model version {version}):")
  for rank, (ad_id, score) in enumerate(zip(ids, scores), 1):
    print(f"  {rank:3d}  {ad_id.decode():<20s} {score:.4f}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  feature_sets = read_requests(FLAGS.requests_file) if FLAGS.requests_file else [features_from_flags()]
  requests = [build_request(features) for features in feature_sets]
  with grpc.insecure_channel(FLAGS.server) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    latencies = []
    for number in range(FLAGS.num_requests):
      started = time.perf_counter()
      try:
        response = stub.Predict(requests[number % len(requests)], timeout=FLAGS.timeout)
      except grpc.RpcError as e:
        raise SystemExit(f"Predict failed: {e.code().name}: {e.details()}") from None
      latencies.append(time.perf_counter() - started)
      if number < len(requests):
        print_answer(number, response)
  if len(latencies) > 1:
    ms = np.asarray(latencies) * 1000.0
    print(
      json.dumps(
        {
          "requests": len(ms),
          "p50_ms": round(float(np.percentile(ms, 50)), 3),
          "p99_ms": round(float(np.percentile(ms, 99)), 3),
        }
      )
    )


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
