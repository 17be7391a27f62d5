"""Benchmark: fgr-serve throughput with server-side batching off and on, at 1, 8, 32 and 128 streams.

  python -m bench.serving_streams --run_dir=runs/ads --base_path=models/ads

Two fgr-serve processes serve the same full-graph version, one with `--enable_batching`, both with
enough gRPC threads for the largest concurrency. Each stream count is measured closed-loop on both,
alternating which goes first, with the same held-out single-query requests (one row each, so batching
has to merge concurrent requests to help).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from bench import serving_common as common
from serving.loadtest import driver

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "fgr-train --output_dir of the served model (for held-out queries).",
                    required=True)
flags.DEFINE_string("base_path", None, "fgr-export --model_base_path.", required=True)
flags.DEFINE_list("streams", ["1", "8", "32", "128"], "Closed-loop concurrencies.")
flags.DEFINE_string("batching_parameters",
                    "max_batch_size { value: 32 } batch_timeout_micros { value: 1000 } "
                    "num_batch_threads { value: 2 } max_enqueued_batches { value: 64 }",
                    "Text BatchingParameters of the batching server.")
flags.DEFINE_integer("grpc_max_threads", 160, "gRPC worker threads of both servers.")
flags.DEFINE_float("warmup_seconds", 2.0, "Unmeasured lead-in per round.")
flags.DEFINE_float("seconds", 8.0, "Measured seconds per round.")
flags.DEFINE_integer("rounds", 2, "Rounds per stream count, alternating the servers' order (pooled).")
flags.DEFINE_integer("num_queries", 500, "Distinct held-out queries to cycle through.")
flags.DEFINE_string("output_dir", "/tmp/fgr_serving_bench", "Where the JSON results and server logs go.")

MODEL = "retrieval"


def main(argv: list[str]) -> None:
  del argv
  requests = common.query_requests(FLAGS.run_dir, FLAGS.num_queries, MODEL)
  workdir = common.workdir(FLAGS.output_dir, "serving_streams")
  params = os.path.join(workdir, "batching.config")
  with open(params, "w") as f:
    f.write(FLAGS.batching_parameters)
  threads = f"--grpc_max_threads={FLAGS.grpc_max_threads}"
  points, ratios = [], {}
  with common.fgr_serve(workdir, MODEL, FLAGS.base_path, [threads], name="fgr-serve-unbatched") as off, \
      common.fgr_serve(workdir, MODEL, FLAGS.base_path,
                       [threads, "--enable_batching", f"--batching_parameters_file={params}"],
                       name="fgr-serve-batched") as on:
    for streams in (int(s) for s in FLAGS.streams):
      spec = driver.LoadSpec(mode="closed", concurrency=streams, warmup_seconds=FLAGS.warmup_seconds,
                             duration_seconds=FLAGS.seconds, progress=False)
      unbatched, batched = common.compare([
          common.Variant(f"batching off, {streams} streams", lambda: driver.GrpcPredictTarget(off.address), requests),
          common.Variant(f"batching on, {streams} streams", lambda: driver.GrpcPredictTarget(on.address), requests),
      ], spec, FLAGS.rounds)
      points += [unbatched, batched]
      ratios[streams] = round(batched["throughput_qps"] / unbatched["throughput_qps"], 3)
      print(f"  {streams} streams: batched/unbatched throughput {ratios[streams]} (target at 32: >= 2)", flush=True)
  path = common.save(FLAGS.output_dir, "serving_streams", {"batching_parameters": FLAGS.batching_parameters,
                                                           "points": points, "throughput_ratios": ratios})
  print(common.table(points, common.POINT_COLUMNS))
  print(json.dumps(ratios))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
