"""Benchmark: what bounds fgr-serve at saturation, from a py-spy profile of its GIL under load.

  python -m bench.serving_profile --run_dir=runs/ads --base_path=models/ads [--batching]

fgr-serve (batching off, or on with --batching) serves closed-loop streams from fgr-loadtest's driver.
Through the measured window, `py-spy record --gil` samples the server: only the thread holding the GIL
is recorded, so the samples taken over the samples expected (rate x seconds) is the share of the time
the one interpreter was busy. Near 1, the GIL bounds throughput at 1 / (GIL time per request),
whatever the cores; each stack is charged to the innermost fgr-serve function on it (time in
TensorFlow, NumPy, protobuf or gRPC code called from there included), or, with no fgr-serve frame on
it, to its innermost frame (gRPC's aio layer, the event loop). The point also gives the CPU per
request of server and client, as every serving benchmark does. Needs py-spy (`pip install -e .[bench]`)
and permission to ptrace the server (root, or kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import os
import subprocess
import threading

from absl import flags

from bench import gil_profile
from bench import serving_common as common
from bench.fixtures import servers
from cli import launch
from clients.loadtest import driver

FLAGS = flags.FLAGS
common.define_flags(warmup_seconds=3.0, seconds=10.0, rounds=None)
flags.adopt_module_key_flags(common)
flags.DEFINE_integer("streams", 32, "Closed-loop streams.")
flags.DEFINE_bool("batching", False, "Profile fgr-serve with --enable_batching.")
flags.DEFINE_string("batching_parameters", common.BATCHING_PARAMETERS, "Text BatchingParameters with --batching.")
flags.DEFINE_list("server_args", [], "More fgr-serve flags, e.g. --noretain_freed_memory.")
flags.DEFINE_integer("rate", 250, "py-spy samples per second.")
flags.DEFINE_bool(
  "native",
  False,
  "Also sample native frames (py-spy --native): names gRPC's Cython and "
  "TensorFlow's C++ functions instead of the Python function that called them. It pauses the "
  "server for each sample and falls behind the rate, so the GIL share is then a lower bound.",
)
flags.DEFINE_integer("top", 15, "Rows of the breakdown to print.")

MODEL = "retrieval"


def main(argv: list[str]) -> None:
  del argv
  if gil_profile.py_spy() is None:
    raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
  requests = common.query_requests(FLAGS.run_dir, FLAGS.num_queries, MODEL)
  workdir = common.workdir(FLAGS.output_dir, "serving_profile")
  extra = list(FLAGS.server_args)
  if FLAGS.batching:
    extra += servers.batching_args(workdir, FLAGS.batching_parameters)
  raw = os.path.join(workdir, "gil.txt")
  spec = common.closed_loop(FLAGS.streams)
  label = f"fgr-serve, batching {'on' if FLAGS.batching else 'off'}, {FLAGS.streams} streams"
  with servers.fgr_serve(workdir, MODEL, FLAGS.base_path, extra) as model:
    started: list[subprocess.Popen] = []
    # py-spy samples the measured window only: it starts when the driver's warm-up ends.
    timer = threading.Timer(
      FLAGS.warmup_seconds,
      lambda: started.append(gil_profile.record(model.process.pid, FLAGS.seconds, raw, FLAGS.rate, FLAGS.native)),
    )
    timer.start()
    (point,) = common.compare(
      [common.Variant(label, lambda: driver.GrpcPredictTarget(model.address), requests, servers=(model,))], spec
    )
    timer.join()
    _, stderr = started[0].communicate(timeout=FLAGS.seconds + 60)
    if started[0].returncode != 0:
      raise SystemExit(f"py-spy failed: {stderr.strip()}")
    if stderr.strip():
      print(f"py-spy: {stderr.strip()}")  # E.g. that it fell behind the sampling rate.
  with open(raw) as f:
    held, charged = gil_profile.breakdown(f)
  expected = FLAGS.rate * int(FLAGS.seconds)
  gil_share = held / expected
  gil_ms = 1e3 * gil_share / point["throughput_qps"]
  summary = {
    "throughput_qps": point["throughput_qps"],
    "gil_held_share": round(gil_share, 3),
    "gil_ms_per_request": round(gil_ms, 3),
    "gil_bound_qps": round(1e3 / gil_ms, 1),
    "server_cpu_ms_per_request": point["server_cpu_ms_per_request"],
    "server_cores": point["server_cores"],
    "client_cores": point["client_cores"],
  }
  rows = [
    {"where": where, "share_of_gil": round(n / held, 3), "ms_per_request": round(gil_ms * n / held, 4)}
    for where, n in charged.most_common()
  ]
  common.finish(
    FLAGS.output_dir,
    "serving_profile",
    {"point": point, "summary": summary, "breakdown": rows, "py_spy_raw": raw, "batching": FLAGS.batching},
    [point],
    summary,
  )
  print(
    common.table(
      rows[: FLAGS.top], (("where", "GIL held in"), ("share_of_gil", "share"), ("ms_per_request", "GIL ms/request"))
    )
  )


if __name__ == "__main__":
  launch.run_module(main)
