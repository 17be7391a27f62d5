"""Benchmark: fgr-serve's native data plane against its Python path, the model alone, and the echo floors.

  python -m bench.serving_native --run_dir=runs/ads --base_path=models/ads

Side by side in one run, every round alternating the order, all driven by the same native load client
(`bench/native_load/load_client.cc`: one completion-queue thread, a few microseconds of CPU per call,
where the Python driver spends a few hundred and, on 2 cores, would cap what the server can show):
- fgr-serve --native=on and --native=off, both with the same server-side batching;
- the native echo PredictionService and the Python one (`bench/echo_server.py`): the transport floors;
- the model alone: the same version loaded in this process through TF's C API (`_fgr_native.Session`,
  as the native server loads it), run at batch 1 paced at --qps beside each fgr-serve latency run, in
  the same seconds (its latency; server-added p50 is the served p50 minus this), and at batch
  --batch_rows from two threads (its throughput: what a server with perfect batching could reach).
Latency is measured open loop at --qps (from each request's intended send time), saturation closed loop
at --streams.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scann  # noqa: F401  # pylint: disable=unused-import  # Registers the Scann ops before loading.
import tensorflow as tf
from absl import flags

import serving.native
from bench import serving_common as common
from bench.fixtures import latency as latency_lib
from bench.fixtures import load_client, servers
from cli import launch
from serving.servables import saved_model_bundle

FLAGS = flags.FLAGS
common.define_flags(warmup_seconds=1.0, seconds=5.0, rounds=2)
flags.adopt_module_key_flags(common)
flags.DEFINE_float("qps", 50.0, "Open-loop rate for the latency comparison.")
flags.DEFINE_integer("streams", 32, "Closed-loop streams for the saturation comparison.")
flags.DEFINE_integer(
  "batch_rows", 32, "Rows per in-process batch of the model alone (--streams: the most any batch could hold)."
)
flags.DEFINE_integer(
  "inter_op_parallelism",
  0,
  "TF's inter_op_parallelism_threads of every server (--tensorflow_inter_op_parallelism) and of the model "
  "alone; 0 (auto) or -1 runs each request or batch, on both paths, in the thread that runs it, N > 0 on "
  "TF's inter-op pool of N threads.",
)
common.define_batching_flag(
  "Text BatchingParameters of both batching servers and of the in-process batching session (saturation): "
  "a batch thread per core, and batches of --streams / 2 rows that fill as the other thread's answers "
  "come back; the 2 ms timeout only bounds a batch that cannot fill (docs/performance.md, Tuning).",
  max_batch_size=16,
  num_batch_threads=2,
  batch_timeout_micros=2000,
)

MODEL = "retrieval"
# The last stretch before a paced call is spun, not slept: waking from a sleep takes ~0.1 ms here.
_SPIN_SECONDS = 2e-4


class _Model:
  """The served version, loaded in this process as the native server loads it."""

  def __init__(self, version: str, requests: list):
    native = serving.native.module()
    if native is None:
      raise RuntimeError(f"The native module is not available: {serving.native.unavailable_reason()}")
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2  # noqa: PLC0415

    config = config_pb2.ConfigProto(inter_op_parallelism_threads=FLAGS.inter_op_parallelism)
    self.session = native.Session(version, ["serve"], config.SerializeToString())
    # Calls and batches run as the native server runs them: in the calling thread, unless the config
    # asks for TF's inter-op pool.
    self.in_caller_thread = saved_model_bundle.caller_thread(config)
    signature = meta_graph_pb2.MetaGraphDef.FromString(self.session.meta_graph_def).signature_def["serving_default"]
    self.fetches = [info.name for info in signature.outputs.values()]
    self.feeds = [
      {signature.inputs[alias].name: tf.make_ndarray(proto) for alias, proto in r.inputs.items()} for r in requests
    ]
    for feeds in self.feeds[:20]:
      self.session.run(feeds, self.fetches)

  def paced_latencies(self, qps: float, seconds: float) -> list[float]:
    """Batch-1 calls started every 1/qps s; each latency counts from its intended start."""
    latencies, interval = [], 1.0 / qps
    start = time.monotonic()
    for i in range(int(qps * seconds)):
      intended = start + i * interval
      delay = intended - time.monotonic() - _SPIN_SECONDS
      if delay > 0:
        time.sleep(delay)
      while time.monotonic() < intended:  # As the load client does: on time, so lateness is not counted.
        pass
      self.session.run(self.feeds[i % len(self.feeds)], self.fetches, in_caller_thread=self.in_caller_thread)
      latencies.append(time.monotonic() - intended)
    return latencies

  def batching_session_qps(self, batching: dict[str, Any], callers: int, seconds: float) -> float:
    """Requests per second of `callers` closed-loop threads through an in-process batching session.

    The session runs behind the same native batch queue as the server's (`_fgr_native.Servable` with
    the servers' BatchingParameters): the model with TF Serving's batching, minus the server.
    """
    native = serving.native.module()
    scheduler = native.BatchScheduler(batching["num_batch_threads"])
    options = {**batching, "scheduler": scheduler, "budget": None, "in_caller_thread": self.in_caller_thread}
    servable = native.Servable(self.session, MODEL, 1, {}, options)
    calls, elapsed = _from_threads(
      callers, seconds, lambda index, n: servable.run(self.feeds[(index + n * callers) % len(self.feeds)], self.fetches)
    )
    servable.close()
    scheduler.stop()
    return calls / elapsed

  def batched_rows_per_second(self, rows: int, seconds: float, threads: int = 2) -> float:
    """Rows per second through batches of `rows` queries, from `threads` threads (TF releases the GIL)."""
    batches = []
    for i in range(4):
      parts = [self.feeds[(i * rows + j) % len(self.feeds)] for j in range(rows)]
      batches.append({name: np.concatenate([p[name] for p in parts]) for name in parts[0]})
    calls, elapsed = _from_threads(
      threads,
      seconds,
      lambda index, n: self.session.run(
        batches[n % len(batches)], self.fetches, in_caller_thread=self.in_caller_thread
      ),
    )
    return calls * rows / elapsed


def _from_threads(threads: int, seconds: float, call: Callable[[int, int], Any]) -> tuple[int, float]:
  """Runs `call(thread index, calls that thread made so far)` in a loop on `threads` threads for `seconds`.

  Returns:
    (calls made in all, seconds from the threads' start until the last one finished).
  """
  done = [0] * threads
  deadline = time.monotonic() + seconds

  def work(index: int) -> None:
    while time.monotonic() < deadline:
      call(index, done[index])
      done[index] += 1

  started = time.monotonic()
  workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
  for worker in workers:
    worker.start()
  for worker in workers:
    worker.join()
  return sum(done), time.monotonic() - started


def _alongside(model: _Model, run: Callable[[], Any]) -> tuple[Any, list[float]]:
  """`run()` (a served load) with the model's own paced batch-1 calls in this process over the same window.

  A served p50 minus an in-process p50 taken in another time slot moves with whatever else the shared
  machine ran in each slot; measured in the same seconds, both see the same load.
  """
  latencies: list[float] = []

  def paced() -> None:
    time.sleep(FLAGS.warmup_seconds)  # The load client's warm-up: its measured window starts after it.
    latencies.extend(model.paced_latencies(FLAGS.qps, FLAGS.seconds))

  thread = threading.Thread(target=paced)
  thread.start()
  try:
    result = run()
  finally:
    thread.join()
  return result, latencies


def _batching_options(text: str) -> dict[str, Any]:
  """The native batch queue's options from text BatchingParameters, as fgr-serve reads them."""
  from google.protobuf import text_format  # noqa: PLC0415

  from serving.batching import batching_session  # noqa: PLC0415
  from serving.config import protos  # noqa: PLC0415

  params = text_format.Parse(text, protos.BatchingParameters())
  options = batching_session.queue_options_from_proto(params, native=True)
  return {
    "num_batch_threads": params.num_batch_threads.value or os.cpu_count() or 1,
    "max_batch_size": options.max_batch_size,
    "batch_timeout_micros": options.batch_timeout_micros,
    "max_enqueued_batches": options.max_enqueued_batches,
    "allowed_batch_sizes": list(options.allowed_batch_sizes),
    "pad_variable_length_inputs": options.pad_variable_length_inputs,
  }


def _point(label: str, load: str, runs: list[dict[str, Any]], cpu_seconds: float | None) -> dict[str, Any]:
  ok = sum(r["ok"] for r in runs)
  return {
    "variant": label,
    "load": f"{load}, {len(runs)} x {FLAGS.seconds:g} s",
    "throughput_qps": round(ok / (len(runs) * FLAGS.seconds), 1),
    **latency_lib.percentiles(np.concatenate([r["latencies"] for r in runs]), (50, 99)),
    "errors": sum(r["errors"] for r in runs),
    "server_cpu_ms_per_request": None if cpu_seconds is None else round(1e3 * cpu_seconds / max(ok, 1), 3),
    # Open loop: how late the load client's sends left (part of every latency above), worst round.
    **(
      {"send_lag_p50_ms": max(r["send_lag_p50_us"] for r in runs) / 1e3}
      if all("send_lag_p50_us" in r for r in runs)
      else {}
    ),
  }


def _server_added(latency: dict[str, dict[str, Any]], served: str) -> float:
  """Served p50 minus the p50 of the model's in-process calls made in the same seconds."""
  return round(latency[served]["p50_ms"] - latency[f"model alone, batch 1, beside {served}"]["p50_ms"], 3)


def main(argv: list[str]) -> None:
  del argv
  version = common.latest_version(FLAGS.base_path)
  requests = common.query_requests(FLAGS.run_dir, FLAGS.num_queries, MODEL)
  workdir = common.workdir(FLAGS.output_dir, "serving_native")
  requests_file = os.path.join(workdir, "requests.bin")
  load_client.write_requests(requests, requests_file)
  batching = servers.batching_args(workdir, FLAGS.batching_parameters)
  batching_options = _batching_options(FLAGS.batching_parameters)
  model = _Model(version, requests)
  loads = {"latency": f"--qps={FLAGS.qps:g}", "saturation": f"--streams={FLAGS.streams}"}
  session_flags = (
    [f"--tensorflow_inter_op_parallelism={FLAGS.inter_op_parallelism}"] if FLAGS.inter_op_parallelism else []
  )
  with (
    servers.fgr_serve(workdir, MODEL, FLAGS.base_path, ["--native=on", *session_flags], name="native") as native,
    servers.fgr_serve(workdir, MODEL, FLAGS.base_path, ["--native=off", *session_flags], name="python") as python,
    servers.fgr_serve(
      workdir, MODEL, FLAGS.base_path, ["--native=on", *session_flags, *batching], name="native-batched"
    ) as native_b,
    servers.fgr_serve(
      workdir, MODEL, FLAGS.base_path, ["--native=off", *session_flags, *batching], name="python-batched"
    ) as python_b,
    servers.native_echo_server(workdir) as native_echo,
    servers.echo_server(workdir) as python_echo,
  ):
    # Latency at a low rate without batching (a batch would wait out its timeout); saturation with it.
    phases = {
      "latency": {"fgr-serve, native": native, "fgr-serve, Python path": python},
      "saturation": {"fgr-serve, native": native_b, "fgr-serve, Python path": python_b},
    }
    for targets in phases.values():
      targets.update({"native echo": native_echo, "Python echo": python_echo})
    memory = {"native": native.memory_mib(), "python": python.memory_mib()}
    points: dict[str, list[dict[str, Any]]] = {}
    for phase, load in loads.items():
      targets = phases[phase]
      runs: dict[str, list] = {label: [] for label in targets}
      cpu: dict[str, float] = {label: 0.0 for label in targets}
      # Saturation: the model alone each round, (batching session req/s, full batches' rows/s).
      model_throughputs: list[tuple[float, float]] = []
      # Latency: each fgr-serve run has the model's in-process calls beside it, in the same seconds.
      beside: dict[str, list[float]] = {label: [] for label in targets if label.startswith("fgr-serve")}
      for r in range(FLAGS.rounds):
        order = list(targets) if r % 2 == 0 else list(targets)[::-1]
        for label in order:
          before = targets[label].cpu_seconds()
          with tempfile.TemporaryDirectory(dir=workdir) as scratch:
            run = functools.partial(
              load_client.drive,
              targets[label].address,
              requests_file,
              load,
              scratch,
              FLAGS.seconds,
              FLAGS.warmup_seconds,
            )
            if phase == "latency" and label in beside:
              result, latencies = _alongside(model, run)
              beside[label] += latencies
            else:
              result = run()
            runs[label].append(result)
          cpu[label] += targets[label].cpu_seconds() - before
          print(
            f"  {phase} round {r + 1}: {label:<24s} {runs[label][-1]['ok'] / FLAGS.seconds:>9,.1f} req/s", flush=True
          )
        if phase == "saturation":
          model_throughputs.append(
            (
              model.batching_session_qps(batching_options, FLAGS.streams, FLAGS.seconds),
              model.batched_rows_per_second(FLAGS.batch_rows, FLAGS.seconds),
            )
          )
      points[phase] = [_point(label, load, runs[label], cpu[label]) for label in targets]
      if phase == "latency":
        points[phase] += [
          {
            "variant": f"model alone, batch 1, beside {label}",
            "load": f"paced at {FLAGS.qps:g}/s in this process, the same seconds",
            **latency_lib.percentiles(latencies),
          }
          for label, latencies in beside.items()
        ]
      else:
        session_qps, rows_qps = np.mean(model_throughputs, axis=0)
        points[phase] += [
          {
            "variant": "model alone, in-process batching session",
            "load": f"{FLAGS.streams} threads, closed loop",
            "throughput_qps": round(float(session_qps), 1),
          },
          {
            "variant": f"model alone, full batches of {FLAGS.batch_rows}, 2 threads",
            "load": "closed loop",
            "throughput_qps": round(float(rows_qps), 1),
          },
        ]
    memory_after = {
      "native": native.memory_mib(),
      "python": python.memory_mib(),
      "native_batched": native_b.memory_mib(),
      "python_batched": python_b.memory_mib(),
    }
  latency = {p["variant"]: p for p in points["latency"]}
  saturation = {p["variant"]: p for p in points["saturation"]}
  session_qps = saturation["model alone, in-process batching session"]["throughput_qps"]
  model_qps = points["saturation"][-1]["throughput_qps"]
  native_qps = saturation["fgr-serve, native"]["throughput_qps"]
  ratios = {
    "native_over_python_saturation": round(native_qps / saturation["fgr-serve, Python path"]["throughput_qps"], 2),
    "native_over_inprocess_batching_session": round(native_qps / session_qps, 2),
    "native_over_model_full_batches": round(native_qps / model_qps, 2),
    "native_over_native_echo_saturation": round(native_qps / saturation["native echo"]["throughput_qps"], 2),
    "native_server_added_p50_ms": _server_added(latency, "fgr-serve, native"),
    "python_server_added_p50_ms": _server_added(latency, "fgr-serve, Python path"),
    "native_over_python_rss": round(memory_after["native"]["rss_mib"] / memory_after["python"]["rss_mib"], 3),
  }
  common.finish(
    FLAGS.output_dir,
    "serving_native",
    {
      "version": version,
      "points": points,
      "ratios": ratios,
      "memory": memory,
      "memory_after": memory_after,
      "batching_parameters": FLAGS.batching_parameters,
    },
    points["latency"] + points["saturation"],
    ratios,
  )


if __name__ == "__main__":
  launch.run_module(main)
