"""Soak: fgr-serve under steady load for minutes, swapping versions every minute.

  python -m bench.soak --seconds=600 --qps=75 --swap_every=60

Starts fgr-serve on a y = a*x + b SavedModel, sends Predict at a fixed rate from a bounded pool of
client threads, publishes a new version (export.versions.publish: temp dir + rename) every
`--swap_every` seconds, and samples the server's resident memory (psutil). Reports RSS growth
(target < 10%, measured from the first sample after the first swap, once every code path has run),
errors (target 0) and latency percentiles. Not a CI test.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import tempfile
import threading
import time

import grpc
import tensorflow as tf
from absl import flags
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench.fixtures import latency, resources, servers
from cli import launch
from export import versions

flags.DEFINE_float("seconds", 600, "How long to soak.")
flags.DEFINE_float("qps", 75, "Requests per second (open loop, fixed rate).")
flags.DEFINE_float("swap_every", 60, "Seconds between version publishes.")
flags.DEFINE_integer(
  "clients",
  16,
  "Client threads (bounds requests in flight; a request due while all are busy is counted as dropped, not queued).",
)
flags.DEFINE_float("deadline", 2.0, "Per-request gRPC deadline in seconds.")
flags.DEFINE_string("output", "", "If set, write the results JSON here.")
FLAGS = flags.FLAGS

_MODEL = "soak"


class _HalfPlus(tf.Module):
  def __init__(self, b: float):
    super().__init__()
    self.a = tf.Variable(0.5)
    self.b = tf.Variable(b)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
  def serve(self, x):
    return {"y": self.a * x + self.b}


def _publish(base: str, b: float) -> int:
  module = _HalfPlus(b)
  with versions.publish(base) as (path, version):
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
  return version


def main(argv) -> None:
  del argv
  workdir = tempfile.mkdtemp(prefix="fgr-soak-")
  base = os.path.join(workdir, _MODEL)
  _publish(base, 2.0)
  with (
    servers.fgr_serve(workdir, _MODEL, base, ["--file_system_poll_wait_seconds=1"], name="server") as server,
    grpc.insecure_channel(server.address) as channel,
  ):
    samples, counts, error_codes, latencies, swaps = _soak(base, server.pid, channel)
  exit_code = server.process.returncode

  after_swap = [s for s in samples if s[0] >= FLAGS.swap_every + 10] or samples
  baseline = after_swap[0][1]
  final = samples[-1][1]
  result = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "seconds": FLAGS.seconds,
    "qps_target": FLAGS.qps,
    "swap_every": FLAGS.swap_every,
    "swaps": swaps,
    "requests": sum(counts.values()),
    **counts,
    "error_codes": error_codes,
    "achieved_qps": round((counts["ok"] + counts["errors"]) / FLAGS.seconds, 1),
    "latency_ms": latency.percentiles(latencies, (50, 99, 99.9), suffix=""),
    "rss_start_mb": round(samples[0][1] / 1024, 1),
    "rss_baseline_mb": round(baseline / 1024, 1),
    "rss_peak_mb": round(max(s[1] for s in samples) / 1024, 1),
    "rss_final_mb": round(final / 1024, 1),
    "rss_growth_pct": round(100.0 * (final - baseline) / baseline, 2),
    "server_exit_code": exit_code,
  }
  print(json.dumps(result, indent=1))
  if FLAGS.output:
    with open(FLAGS.output, "w", encoding="utf-8") as f:
      json.dump({**result, "samples": samples}, f, indent=1)


def _soak(base: str, server_pid: int, channel: grpc.Channel):
  """Sends Predicts at --qps and publishes a version every --swap_every seconds, for --seconds.

  Returns (samples of (seconds since start, server RSS kB, version published), counts, error codes,
  latencies in seconds, swaps).
  """
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  request = predict_pb2.PredictRequest()
  request.model_spec.name = _MODEL
  request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0, 2.0, 3.0], dtype=tf.float32))

  lock = threading.Lock()
  counts = {"ok": 0, "errors": 0, "dropped": 0}
  error_codes: dict[str, int] = {}
  in_flight = threading.BoundedSemaphore(FLAGS.clients)

  latencies: list[float] = []

  def call() -> None:
    started = time.monotonic()
    try:
      stub.Predict(request, timeout=FLAGS.deadline)
      key = "ok"
      with lock:
        latencies.append(time.monotonic() - started)
    except grpc.RpcError as e:
      key = "errors"
      with lock:
        error_codes[e.code().name] = error_codes.get(e.code().name, 0) + 1
    finally:
      in_flight.release()
    with lock:
      counts[key] += 1

  samples = []  # (seconds since start, rss kB, version published)
  pool = concurrent.futures.ThreadPoolExecutor(FLAGS.clients)
  start = time.monotonic()
  next_swap = start + FLAGS.swap_every
  next_sample = start
  swaps = 0
  version = 1
  interval = 1.0 / FLAGS.qps
  sent = 0
  while True:
    now = time.monotonic()
    if now - start >= FLAGS.seconds:
      break
    if now >= next_sample:
      samples.append((round(now - start, 1), resources.rss_bytes(server_pid) // 1024, version))
      next_sample += 5
    if now >= next_swap:
      version = _publish(base, 2.0 + version)
      swaps += 1
      next_swap += FLAGS.swap_every
    due = start + sent * interval
    if due > now:
      time.sleep(min(due - now, 0.05))
      continue
    if in_flight.acquire(blocking=False):
      pool.submit(call)
    else:  # All clients busy: the server is behind; count it, don't queue.
      with lock:
        counts["dropped"] += 1
    sent += 1
  pool.shutdown(wait=True)
  samples.append((round(time.monotonic() - start, 1), resources.rss_bytes(server_pid) // 1024, version))
  return samples, counts, error_codes, latencies, swaps


if __name__ == "__main__":
  launch.run_module(main)
