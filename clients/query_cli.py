"""fgr-query: sends raw query features to a TF Serving-compatible server and prints the answers.

It speaks plain TF Serving gRPC (GetModelMetadata, then PredictionService.Predict), so it works against
fgr-serve and against stock TF Serving alike. Features come from flags (one request) or from a JSONL
file (one request per line, each a JSON object of feature name to a value or a list), each value sent
in its input's dtype and shape, as the signature declares them.
"""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
from absl import app, flags
from tensorflow_serving.apis import prediction_service_pb2_grpc

from clients import grpc_channel, query
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
  "requests_file",
  None,
  "JSONL of requests (feature name -> value or list, each sent in its input's dtype and shape); "
  "overrides the feature flags. String inputs a line leaves out are sent empty.",
)
flags.DEFINE_integer(
  "num_requests",
  None,
  "Requests to send, cycling through the requests (default: each once); with more than one, latency "
  "percentiles are printed.",
  lower_bound=1,
)
flags.DEFINE_integer("top", 10, "Values to print per output and request; 0 prints them all.", lower_bound=0)
flags.DEFINE_float("timeout", 10.0, "Per-request deadline in seconds.")
flags.register_validator("timeout", lambda seconds: seconds > 0, message="--timeout must be more than 0 seconds")
flags.DEFINE_float(
  "wait_for_server",
  0.0,
  "Seconds to wait for the server to accept connections first (one just started takes a while); 0 fails "
  "at once when none answers.",
  lower_bound=0.0,
)
flags.DEFINE_bool("json", False, "Print one JSON object per answer instead of a table.")
grpc_channel.define_flags()
flags.adopt_module_key_flags(grpc_channel)  # --help lists the --tls* flags with the client's own.


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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  feature_sets = (
    request_source.read_feature_lines(FLAGS.requests_file) if FLAGS.requests_file else [features_from_flags()]
  )
  spec = query.model_spec(FLAGS.model_name, FLAGS.signature_name, FLAGS.model_version)
  with grpc_channel.channel(FLAGS.server, grpc_channel.tls_from_flags()) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
      if FLAGS.wait_for_server:
        query.wait_for_server(channel, FLAGS.server, FLAGS.wait_for_server)
      inputs = query.signature_inputs(stub, spec, FLAGS.timeout)
    except query.QueryError as e:
      raise SystemExit(str(e)) from None
    requests = query.typed_requests(feature_sets, spec, inputs, FLAGS.requests_file or "the flags' request")
    latencies = []
    for number in range(FLAGS.num_requests or len(requests)):
      started = time.perf_counter()
      try:
        response = stub.Predict(requests[number % len(requests)], timeout=FLAGS.timeout)
      except grpc.RpcError as e:
        raise SystemExit(f"Predict failed: {e.code().name}: {e.details()}") from None
      latencies.append(time.perf_counter() - started)
      if number < len(requests):
        row = query.answer_row(response, FLAGS.top or None)
        version = response.model_spec.version.value
        if FLAGS.json:
          print(json.dumps({"request": number, "version": version, **row}))
        else:
          print(query.format_row(number, version, row))
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


if __name__ == "__main__":  # As its console script: a user's mistake is one line, not a traceback.
  from cli import launch

  launch.run_module(main)
