"""fgr-loadtest: load any TF Serving gRPC endpoint (fgr-serve or stock) and report what it sustains.

  fgr-loadtest --server=127.0.0.1:8500 --model_name=retrieval --mode=open --qps=300 --duration_seconds=20
  fgr-loadtest --server=127.0.0.1:8500 --model_name=retrieval --mode=closed --concurrency=32 \\
               --requests_file=requests.tfrecord

Prints the throughput, latency percentiles (from intended send times, HdrHistogram) and errors by
gRPC status, and writes `<output_prefix>.json` and `<output_prefix>.png` (latency over time).
"""

from __future__ import annotations

import gc
import sys

import grpc
from absl import app, flags, logging
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from clients import grpc_channel, query
from clients.loadtest import driver, report, request_source

FLAGS = flags.FLAGS
flags.DEFINE_string("server", "127.0.0.1:8500", "host:port of the gRPC PredictionService.")
flags.DEFINE_string("model_name", "retrieval", "ModelSpec.name put on every request.")
flags.DEFINE_string(
  "signature_name", None, "ModelSpec.signature_name; unset keeps the requests' own (empty means serving_default)."
)
flags.DEFINE_integer("model_version", None, "ModelSpec.version; unset lets the server choose.")
flags.DEFINE_enum(
  "mode",
  "open",
  driver.MODES,
  "open: fixed arrival rate --qps; closed: --concurrency streams, each sending when its previous answer arrives.",
)
flags.DEFINE_float("qps", 100.0, "Open loop: offered requests per second.")
flags.DEFINE_integer("concurrency", 8, "Closed loop: concurrent streams.")
flags.DEFINE_float("warmup_seconds", 5.0, "Unmeasured lead-in at the same load.")
flags.DEFINE_float("duration_seconds", 20.0, "Measured period.")
flags.DEFINE_float("timeout", 10.0, "Per-request deadline in seconds.")
flags.register_validator("timeout", lambda seconds: seconds > 0, message="--timeout must be more than 0 seconds")
flags.DEFINE_integer("channels", 1, "gRPC channels (HTTP/2 connections) to spread requests over.", lower_bound=1)
flags.DEFINE_integer("max_in_flight", 4096, "Open loop: cap on outstanding requests.", lower_bound=1)
flags.DEFINE_integer("max_requests", None, "Hard cap on requests sent, warm-up included.", lower_bound=1)
flags.DEFINE_string(
  "requests_file",
  None,
  "Recorded requests: TFRecord of PredictRequest or PredictionLog "
  "(e.g. a warm-up file), or .jsonl of feature dicts, typed by the signature as fgr-query's --requests_file. "
  "Without it, synthetic queries.",
)
flags.DEFINE_string(
  "synthetic_run_dir", None, "fgr-train --output_dir whose held-out queries to send (so they match the served catalog)."
)
flags.DEFINE_integer("synthetic_num_ads", 20_000, "Catalog size of the synthetic log without --synthetic_run_dir.")
flags.DEFINE_integer(
  "num_requests", 1000, "Distinct requests to cycle through (synthetic, or the file's first).", lower_bound=1
)
flags.DEFINE_string("output_prefix", "loadtest", "Writes <prefix>.json and <prefix>.png.")
flags.DEFINE_bool("progress", True, "Live progress bar on stderr.")
grpc_channel.define_flags()
flags.adopt_module_key_flags(grpc_channel)  # --help lists the --tls* flags with the client's own.


def load_requests(tls: grpc_channel.Tls | None) -> list[predict_pb2.PredictRequest]:
  """The requests to send, addressed to --model_name/--signature_name/--model_version."""
  if FLAGS.requests_file and request_source.is_jsonl(FLAGS.requests_file):
    requests = signature_typed_requests(FLAGS.requests_file, tls)
  elif FLAGS.requests_file:
    requests = request_source.read_requests_file(FLAGS.requests_file, FLAGS.num_requests)
  else:
    requests = request_source.synthetic_requests(FLAGS.num_requests, FLAGS.synthetic_run_dir, FLAGS.synthetic_num_ads)
  return request_source.with_model_spec(requests, FLAGS.model_name, FLAGS.signature_name, FLAGS.model_version)


def signature_typed_requests(path: str, tls: grpc_channel.Tls | None) -> list[predict_pb2.PredictRequest]:
  """A JSONL file's feature dicts as fgr-query sends them: each value in its input's dtype and shape,
  string inputs a line leaves out sent empty.

  Sent as plain string tensors, a file fgr-query answers (a `search_with_options` knob, a float input,
  a line without a history) was refused in every request. The signature comes from the server's
  GetModelMetadata, after the file is read, so a bad line is named before any connection.

  Raises:
    ValueError: the file can't be read, holds a bad line or no request, or the server refused to say
      what the signature takes (the message says which). A server without GetModelMetadata gets the
      values as strings.
  """
  features = request_source.read_feature_lines(path)[: FLAGS.num_requests]
  spec = query.model_spec(FLAGS.model_name, FLAGS.signature_name or "", FLAGS.model_version)
  with grpc_channel.channel(FLAGS.server, tls) as channel:
    try:
      inputs = query.signature_inputs(prediction_service_pb2_grpc.PredictionServiceStub(channel), spec, FLAGS.timeout)
    except query.QueryError as e:
      if e.code != grpc.StatusCode.UNIMPLEMENTED:
        raise ValueError(f"cannot type {path}'s features: {e}") from None
      # A Predict-only server (a load-test echo, a proxy) cannot say what the signature takes: the
      # file's values go as strings, as they did before fgr-loadtest typed them.
      logging.warning("%s: the server has no GetModelMetadata, so %s's values are sent as strings", FLAGS.server, path)
      return [request_source.features_request(f) for f in features]
  return query.typed_requests(features, spec, inputs, path)


def freeze_gc() -> None:
  """Moves every object alive now (modules, TensorFlow's registries) out of the garbage collector's reach.

  A full collection then traverses only what the run creates: one over all of TensorFlow's start-up
  objects would stall the sender, and the stall would show up as server latency. (fgr-serve does the
  same at start-up; the clients keep their own copy, as they import nothing from serving/.)
  """
  gc.collect()
  gc.freeze()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    spec = driver.LoadSpec(
      mode=FLAGS.mode,
      qps=FLAGS.qps,
      concurrency=FLAGS.concurrency,
      warmup_seconds=FLAGS.warmup_seconds,
      duration_seconds=FLAGS.duration_seconds,
      max_in_flight=FLAGS.max_in_flight,
      max_requests=FLAGS.max_requests,
      drain_seconds=FLAGS.timeout + 5,
      progress=FLAGS.progress,
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  tls = grpc_channel.tls_from_flags()  # Before the requests: a bad PEM file fails at once.
  requests = load_requests(tls)
  logging.info("Loaded %d distinct requests; %s against %s", len(requests), spec.describe(), FLAGS.server)
  target = driver.GrpcPredictTarget(FLAGS.server, FLAGS.timeout, FLAGS.channels, tls)
  freeze_gc()
  result = driver.run(target, requests, spec)
  json_path, png_path = FLAGS.output_prefix + ".json", FLAGS.output_prefix + ".png"
  report.write_json(
    report.to_dict(result, {"model_name": FLAGS.model_name, "num_distinct_requests": len(requests), "plot": png_path}),
    json_path,
  )
  report.plot(result, png_path)
  print(report.summary(result))
  print(f"wrote {json_path} and {png_path}")
  if result.successes == 0:
    sys.exit(1)


if __name__ == "__main__":  # As its console script: a user's mistake is one line, not a traceback.
  from cli import launch

  launch.run_module(main)
