"""Benchmark: fgr-serve throughput with server-side batching off and on, at 1, 8, 32 and 128 streams.

  python -m bench.serving_streams --run_dir=runs/ads --base_path=models/ads

Two fgr-serve processes serve the same full-graph version, one with `--enable_batching`, both with
enough gRPC threads for the largest concurrency. Each stream count is measured closed-loop on both,
alternating which goes first, with the same held-out single-query requests (one row each, so batching
has to merge concurrent requests to help).
"""

from __future__ import annotations

from absl import flags

from bench import serving_common as common
from bench.fixtures import servers
from cli import launch
from clients.loadtest import driver

FLAGS = flags.FLAGS
common.define_flags(warmup_seconds=2.0, seconds=8.0, rounds=2)
flags.adopt_module_key_flags(common)
flags.DEFINE_list("streams", ["1", "8", "32", "128"], "Closed-loop concurrencies.")
flags.DEFINE_string(
  "batching_parameters", common.BATCHING_PARAMETERS, "Text BatchingParameters of the batching server."
)
flags.DEFINE_integer("grpc_max_threads", 160, "gRPC worker threads of both servers.")

MODEL = "retrieval"


def main(argv: list[str]) -> None:
  del argv
  requests = common.query_requests(FLAGS.run_dir, FLAGS.num_queries, MODEL)
  workdir = common.workdir(FLAGS.output_dir, "serving_streams")
  batching = servers.batching_args(workdir, FLAGS.batching_parameters)
  threads = f"--grpc_max_threads={FLAGS.grpc_max_threads}"
  points, ratios = [], {}
  with (
    servers.fgr_serve(workdir, MODEL, FLAGS.base_path, [threads], name="fgr-serve-unbatched") as off,
    servers.fgr_serve(workdir, MODEL, FLAGS.base_path, [threads, *batching], name="fgr-serve-batched") as on,
  ):
    for streams in (int(s) for s in FLAGS.streams):
      spec = common.closed_loop(streams)
      unbatched, batched = common.compare(
        [
          common.Variant(
            f"batching off, {streams} streams", lambda: driver.GrpcPredictTarget(off.address), requests, servers=(off,)
          ),
          common.Variant(
            f"batching on, {streams} streams", lambda: driver.GrpcPredictTarget(on.address), requests, servers=(on,)
          ),
        ],
        spec,
        FLAGS.rounds,
      )
      points += [unbatched, batched]
      ratios[streams] = round(batched["throughput_qps"] / unbatched["throughput_qps"], 3)
      print(f"  {streams} streams: batched/unbatched throughput {ratios[streams]} (target at 32: >= 2)", flush=True)
  common.finish(
    FLAGS.output_dir,
    "serving_streams",
    {"batching_parameters": FLAGS.batching_parameters, "points": points, "throughput_ratios": ratios},
    points,
    ratios,
  )


if __name__ == "__main__":
  launch.run_module(main)
