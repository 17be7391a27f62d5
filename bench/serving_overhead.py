"""Benchmark: what gRPC and the server add, with the same client in the same run.

  python -m bench.serving_overhead --run_dir=runs/ads --base_path=models/ads

Three variants of the same request stream, all driven by fgr-loadtest's driver:
- gRPC `Predict` on `serving_default` of fgr-serve (another process);
- an in-process call of the same SavedModel, loaded in this process exactly as fgr-serve loads it
  (`serving.servables.saved_model_bundle`: a TF1 session run through `TF_SessionRun` with NumPy
  feeds) and called on a worker thread; what remains between the two is gRPC, proto conversion and
  the server's dispatch;
- an echo PredictionService (another process) answering a fixed full-graph-sized response: the
  transport floor of a thread-pool `grpc.server` in Python;
- the same echo in C++ (bench/native_echo, built by `make install`): the floor of a native server,
  when built (`--native_echo`).
Latency is measured open-loop at a low rate (p50); saturation throughput closed-loop with many streams, where
a fourth variant, fgr-serve with server-side batching on (a second process), shows what a TF Serving user
would run for throughput. Both fgr-serve ratios are reported.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from typing import Any

import numpy as np
import scann  # noqa: F401  # pylint: disable=unused-import  # Registers the Scann ops before loading.
import tensorflow as tf
from absl import flags
from tensorflow_serving.apis import predict_pb2

from bench import serving_common as common
from bench.fixtures import servers
from cli import launch
from clients.loadtest import driver
from serving.servables import saved_model_bundle

FLAGS = flags.FLAGS
common.define_flags(warmup_seconds=1.0, seconds=5.0, rounds=4)
flags.adopt_module_key_flags(common)
flags.DEFINE_float("qps", 50.0, "Open-loop rate for the latency comparison.")
flags.DEFINE_integer("streams", 16, "Closed-loop streams for the saturation comparison.")
flags.DEFINE_enum(
  "native_echo",
  "auto",
  ["auto", "on", "off"],
  "Also measure the C++ echo floor: auto runs it when build/native/echo_server is built; on requires it.",
)
flags.DEFINE_string(
  "batching_parameters",
  common.BATCHING_PARAMETERS,
  "Text BatchingParameters of the batching fgr-serve (saturation only).",
)

MODEL = "retrieval"
NATIVE_ECHO = "native echo PredictionService (C++)"
BATCHED = "gRPC Predict to fgr-serve, batching on"


class InProcessTarget:
  """Runs a loaded version's signature through its session on a thread pool (TF releases the GIL)."""

  def __init__(
    self, bundle: saved_model_bundle.SavedModelBundle, threads: int, signature_name: str = "serving_default"
  ):
    self.name = "in-process SavedModel session"
    signature = bundle.signature_defs[signature_name]
    self._inputs = {alias: info.name for alias, info in signature.inputs.items()}
    self._fetches = [info.name for info in signature.outputs.values()]
    self._run = bundle.session_run
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)

  def feeds(self, request: predict_pb2.PredictRequest) -> dict[str, np.ndarray]:
    """A PredictRequest's inputs as the session's feeds (converted once, before the run)."""
    return {self._inputs[alias]: tf.make_ndarray(proto) for alias, proto in request.inputs.items()}

  async def open(self) -> None:
    pass

  async def call(self, feeds: dict[str, np.ndarray]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, feeds, self._fetches)

  async def close(self) -> None:
    self._pool.shutdown(wait=True)


def main(argv: list[str]) -> None:
  del argv
  version = common.latest_version(FLAGS.base_path)
  requests = common.query_requests(FLAGS.run_dir, FLAGS.num_queries, MODEL)
  bundle = saved_model_bundle.SavedModelBundle(MODEL, int(os.path.basename(version)), version)
  feeds = [InProcessTarget(bundle, 1).feeds(r) for r in requests]
  fetches = [info.name for info in bundle.signature_defs["serving_default"].outputs.values()]
  for f in feeds[:20]:  # Warm up like the server's warm-up replay.
    bundle.session_run(f, fetches)
  workdir = common.workdir(FLAGS.output_dir, "serving_overhead")
  batching = servers.batching_args(workdir, FLAGS.batching_parameters)
  native_echo = FLAGS.native_echo == "on" or (FLAGS.native_echo == "auto" and servers.native_echo_binary())
  if FLAGS.native_echo == "auto" and not native_echo:
    print("no native echo floor: build/native/echo_server is not built (make install)", flush=True)
  with contextlib.ExitStack() as stack:
    model = stack.enter_context(servers.fgr_serve(workdir, MODEL, FLAGS.base_path))
    echo = stack.enter_context(servers.echo_server(workdir))
    batched = stack.enter_context(
      servers.fgr_serve(workdir, MODEL, FLAGS.base_path, batching, name="fgr-serve-batched")
    )
    native = stack.enter_context(servers.native_echo_server(workdir)) if native_echo else None

    def variants(threads: int) -> list[common.Variant]:
      chosen = [
        common.Variant(
          "gRPC Predict to fgr-serve", lambda: driver.GrpcPredictTarget(model.address), requests, servers=(model,)
        ),
        common.Variant("in-process SavedModel call", lambda: InProcessTarget(bundle, threads), feeds),
        common.Variant(
          "echo PredictionService", lambda: driver.GrpcPredictTarget(echo.address), requests, servers=(echo,)
        ),
      ]
      if native:
        chosen.append(
          common.Variant(NATIVE_ECHO, lambda: driver.GrpcPredictTarget(native.address), requests, servers=(native,))
        )
      return chosen

    latency = common.compare(variants(1), common.open_loop(FLAGS.qps), FLAGS.rounds)
    saturation = common.compare(
      variants(FLAGS.streams)
      + [
        common.Variant(
          BATCHED,
          lambda: driver.GrpcPredictTarget(batched.address),
          requests,
          servers=(batched,),
        )
      ],
      common.closed_loop(FLAGS.streams),
      max(2, FLAGS.rounds // 2),
    )
    memory = model.memory_mib()
  grpc_, local, echo_ = latency[:3]
  overhead = grpc_["p50_ms"] - local["p50_ms"]
  by_label = {point["variant"]: point for point in saturation}
  echo_qps = by_label["echo PredictionService"]["throughput_qps"]
  ratios = {
    "grpc_minus_inprocess_p50_ms": round(overhead, 3),
    "echo_p50_ms": echo_["p50_ms"],
    "overhead_over_echo_p50": round(overhead / echo_["p50_ms"], 3),  # Target <= 1.2.
    # Target >= 0.5, with batching off and on.
    "fgr_serve_over_echo_saturation_qps": round(by_label["gRPC Predict to fgr-serve"]["throughput_qps"] / echo_qps, 3),
    "fgr_serve_batching_over_echo_saturation_qps": round(by_label[BATCHED]["throughput_qps"] / echo_qps, 3),
  }
  if native:
    native_qps = by_label[NATIVE_ECHO]["throughput_qps"]
    ratios["native_echo_p50_ms"] = latency[3]["p50_ms"]
    ratios["native_echo_over_echo_saturation_qps"] = round(native_qps / echo_qps, 3)
    ratios["fgr_serve_batching_over_native_echo_saturation_qps"] = round(
      by_label[BATCHED]["throughput_qps"] / native_qps, 3
    )
  common.finish(
    FLAGS.output_dir,
    "serving_overhead",
    {
      "version": version,
      "latency": latency,
      "saturation": saturation,
      "ratios": ratios,
      "batching_parameters": FLAGS.batching_parameters,
      "fgr_serve_memory": memory,
    },
    latency + saturation,
    ratios,
  )


if __name__ == "__main__":
  launch.run_module(main)
