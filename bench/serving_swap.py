"""Failed requests and latency while fgr-serve swaps model versions under load.

  python -m bench.serving_swap --clients=32 --seconds=14

Serves the MLP of bench/serving_batching.py as version 1, drives it with
`--clients` concurrent gRPC Predict callers, publishes version 2 (written
aside, renamed in) mid-run, and reports failures plus latency before, during
and after the swap. The swap window runs from publishing until one second
after the first answer from version 2; the first --warmup_seconds are not
counted.
"""

import contextlib
import os
import tempfile
import threading
import time

import grpc
from absl import app, flags
from tensorflow_serving.apis import prediction_service_pb2_grpc

from bench import serving_batching
from bench.fixtures import latency

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
    channels = [stack.enter_context(grpc.insecure_channel(server.address)) for _ in range(4)]
    stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in channels]
    records = []  # (start offset, latency, version or error code name)
    lock = threading.Lock()
    start = time.monotonic()
    end = start + FLAGS.seconds

    def client(i):
      stub = stubs[i % len(stubs)]
      while time.monotonic() < end:
        t0 = time.monotonic()
        try:
          outcome = stub.Predict(request, timeout=30).model_spec.version.value
        except grpc.RpcError as e:
          outcome = e.code().name
        with lock:
          records.append((t0 - start, time.monotonic() - t0, outcome))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(FLAGS.clients)]
    for t in threads:
      t.start()
    time.sleep(_PUBLISH_AT.value)
    serving_batching.export_mlp(base, FLAGS.dim, FLAGS.hidden, version=2)
    published = time.monotonic() - start  # The rename made v2 visible.
    for t in threads:
      t.join()

  first_v2 = min((r[0] for r in records if r[2] == 2), default=None)
  window_end = (first_v2 + 1.0) if first_v2 is not None else FLAGS.seconds
  failures = [r for r in records if not isinstance(r[2], int)]
  lead_in = FLAGS.warmup_seconds
  phases = {
    "before": [r[1] for r in records if lead_in <= r[0] < published],
    "swap": [r[1] for r in records if published <= r[0] < window_end],
    "after": [r[1] for r in records if r[0] >= window_end],
  }
  print(
    f"{FLAGS.clients} clients, batching "
    f"{'on' if _WITH_BATCHING.value else 'off'}, {FLAGS.seconds:.0f} s, "
    f"v2 published at "
    f"{published:.1f} s, first v2 answer at "
    f"{first_v2 if first_v2 is None else round(first_v2, 1)} s"
  )
  print(
    f"requests: {len(records)}, failed: {len(failures)}, served by v1: "
    f"{sum(r[2] == 1 for r in records)}, by v2: "
    f"{sum(r[2] == 2 for r in records)}"
  )
  print("| phase | requests | p50 / p99 ms |")
  print("|---|---|---|")
  for phase, latencies in phases.items():
    print(f"| {phase} | {len(latencies)} | {_percentiles(latencies)} |")


if __name__ == "__main__":
  app.run(main)
