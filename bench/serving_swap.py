"""Failed requests and latency while fgr-serve swaps model versions under load.

  python -m bench.serving_swap --clients=32 --seconds=14

Serves the MLP of bench/serving_batching.py as version 1, drives it with its
`--clients` concurrent gRPC Predict callers, publishes version 2 (written
aside, renamed in) mid-run, and reports failures plus latency before, during
and after the swap. The swap window runs from publishing until one second
after the first answer from version 2; the first --warmup_seconds are not
counted.
"""

import contextlib
import os
import tempfile
import time

from absl import flags

from bench import serving_batching
from bench.fixtures import latency
from cli import launch

FLAGS = flags.FLAGS
_PUBLISH_AT = flags.DEFINE_float("publish_at", 6.0, "Seconds into the run to publish v2.")
_WITH_BATCHING = flags.DEFINE_bool(
  "with_batching", False, "Serve with --enable_batching (--batching_parameters) during the swap."
)


def _percentiles(latencies):
  p = latency.percentiles(latencies, digits=1)
  return f"{p['p50_ms']:.1f} / {p['p99_ms']:.1f}" if p else "n/a"


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as workdir, contextlib.ExitStack() as stack:
    base = os.path.join(workdir, "mlp")
    serving_batching.export_mlp(base, FLAGS.dim, FLAGS.hidden)
    server = stack.enter_context(serving_batching.serve_mlp(base, workdir, _WITH_BATCHING.value))
    request = serving_batching.predict_request(FLAGS.dim)
    with serving_batching.predict_callers(server.address, request, FLAGS.clients, FLAGS.seconds) as load:
      time.sleep(_PUBLISH_AT.value)
      serving_batching.export_mlp(base, FLAGS.dim, FLAGS.hidden, version=2)
      published = load.elapsed()  # The rename made v2 visible.
  calls = load.calls

  first_v2 = min((c.start for c in calls if c.outcome == 2), default=None)
  window_end = (first_v2 + 1.0) if first_v2 is not None else FLAGS.seconds
  failures = [c for c in calls if not c.ok]
  lead_in = FLAGS.warmup_seconds
  phases = {
    "before": [c.seconds for c in calls if lead_in <= c.start < published],
    "swap": [c.seconds for c in calls if published <= c.start < window_end],
    "after": [c.seconds for c in calls if c.start >= window_end],
  }
  print(
    f"{FLAGS.clients} clients, batching "
    f"{'on' if _WITH_BATCHING.value else 'off'}, {FLAGS.seconds:.0f} s, "
    f"v2 published at "
    f"{published:.1f} s, first v2 answer at "
    f"{first_v2 if first_v2 is None else round(first_v2, 1)} s"
  )
  print(
    f"requests: {len(calls)}, failed: {len(failures)}, served by v1: "
    f"{sum(c.outcome == 1 for c in calls)}, by v2: "
    f"{sum(c.outcome == 2 for c in calls)}"
  )
  print("| phase | requests | p50 / p99 ms |")
  print("|---|---|---|")
  for phase, latencies in phases.items():
    print(f"| {phase} | {len(latencies)} | {_percentiles(latencies)} |")


if __name__ == "__main__":
  launch.run_module(main)
