"""Throughput of fgr-serve with server-side batching off and on.

  python -m bench.serving_batching --clients=32 --seconds=15

Exports a small MLP SavedModel (x [N, 256] -> 1024 -> 256), then for each
mode starts `python -m serving.model_servers.main` in a subprocess and drives
it with `--clients` concurrent gRPC Predict callers (one row per request),
reporting requests/s, failures and latency percentiles.
"""

import contextlib
import dataclasses
import os
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import tensorflow as tf
from absl import flags
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench import serving_common as common
from bench.fixtures import latency, servers
from cli import launch

# bench/serving_swap.py serves the same MLP with the same callers, and reads these flags too.
FLAGS = flags.FLAGS
flags.DEFINE_integer("clients", 32, "Concurrent client threads.")
flags.DEFINE_float("seconds", 15.0, "Measured seconds per mode.")
flags.DEFINE_float("warmup_seconds", 3.0, "Unmeasured lead-in.")
flags.DEFINE_integer("dim", 256, "Input/output width of the MLP.")
flags.DEFINE_integer("hidden", 1024, "Hidden width of the MLP.")
common.define_batching_flag(
  "Text BatchingParameters for the batching-on run.",
  batch_timeout_micros=2000,
  num_batch_threads=2,
  max_enqueued_batches=100,
)


class _Mlp(tf.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    rng = np.random.default_rng(0)
    self.w1 = tf.Variable(rng.normal(0, 0.05, (dim, hidden)).astype("f4"))
    self.w2 = tf.Variable(rng.normal(0, 0.05, (hidden, dim)).astype("f4"))

  @tf.function
  def serve(self, x):
    return {"y": tf.matmul(tf.nn.relu(tf.matmul(x, self.w1)), self.w2)}


def export_mlp(base: str, dim: int, hidden: int, version: int = 1) -> None:
  """Exports the MLP as `<base>/<version>` (written aside, then renamed in)."""
  module = _Mlp(dim, hidden)
  signature = module.serve.get_concrete_function(tf.TensorSpec([None, dim], tf.float32, name="x"))
  staging = os.path.join(os.path.dirname(base), f".staging-{version}")
  tf.saved_model.save(module, staging, signatures={"serving_default": signature})
  os.makedirs(base, exist_ok=True)
  os.rename(staging, os.path.join(base, str(version)))


def serve_mlp(base: str, workdir: str, batching: bool) -> contextlib.AbstractContextManager[servers.ServerProcess]:
  """fgr-serve on the MLP at `base`, with --batching_parameters when `batching`."""
  extra = ["--grpc_max_threads=64"]
  if batching:
    extra += servers.batching_args(workdir, FLAGS.batching_parameters)
  return servers.fgr_serve(workdir, "mlp", base, extra, name=f"server-{batching}")


def predict_request(dim: int) -> predict_pb2.PredictRequest:
  """One-row Predict request for the MLP."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "mlp"
  request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.random.default_rng(1).normal(size=(1, dim)).astype("f4")))
  return request


@dataclasses.dataclass(frozen=True)
class Call:
  """One Predict call: when it started (seconds into the load), how long it took, and how it ended."""

  start: float
  seconds: float
  outcome: int | str  # The version that answered, or the gRPC status code's name.

  @property
  def ok(self) -> bool:
    return isinstance(self.outcome, int)


@dataclasses.dataclass
class Load:
  """What `predict_callers` yields: when the load began (time.monotonic()), and the calls so far."""

  started: float
  calls: list[Call]

  def elapsed(self) -> float:
    return time.monotonic() - self.started


@contextlib.contextmanager
def predict_callers(address: str, request: predict_pb2.PredictRequest, clients: int, seconds: float) -> Iterator[Load]:
  """`clients` threads send `request` back to back over 4 channels for `seconds`, from the block's start.

  Leaving the block waits for them; `Load.calls` then holds every call.
  """
  channels = [grpc.insecure_channel(address) for _ in range(4)]
  stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in channels]
  load, lock = Load(time.monotonic(), []), threading.Lock()
  end = load.started + seconds

  def client(i: int) -> None:
    stub = stubs[i % len(stubs)]
    while (t0 := time.monotonic()) < end:
      try:
        outcome = stub.Predict(request, timeout=30).model_spec.version.value
      except grpc.RpcError as e:
        outcome = e.code().name
      with lock:
        load.calls.append(Call(t0 - load.started, time.monotonic() - t0, outcome))

  threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
  for t in threads:
    t.start()
  try:
    yield load
  finally:
    for t in threads:
      t.join()
    for c in channels:
      c.close()


def _drive(address: str, clients: int, warmup: float, seconds: float, dim: int) -> dict[str, float]:
  """Requests/s, failures and latency percentiles of the calls started after the warm-up."""
  with predict_callers(address, predict_request(dim), clients, warmup + seconds) as load:
    pass  # The callers stop on their own; leaving the block waits for them.
  measured = [c for c in load.calls if c.start >= warmup]
  ok = [c.seconds for c in measured if c.ok]
  return {"qps": len(ok) / seconds, "failures": float(len(measured) - len(ok)), **latency.percentiles(ok)}


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as workdir:
    base = os.path.join(workdir, "mlp")
    export_mlp(base, FLAGS.dim, FLAGS.hidden)
    results = {}
    for batching in (False, True):
      with serve_mlp(base, workdir, batching) as server:
        results[batching] = _drive(server.address, FLAGS.clients, FLAGS.warmup_seconds, FLAGS.seconds, FLAGS.dim)
  print(
    f"MLP {FLAGS.dim}->{FLAGS.hidden}->{FLAGS.dim}, one row per "
    f"request, {FLAGS.clients} concurrent gRPC clients, "
    f"{FLAGS.seconds:.0f} s per mode"
  )
  print("| batching | requests/s | failed | p50 ms | p99 ms |")
  print("|---|---|---|---|---|")
  for batching, r in results.items():
    print(
      f"| {'on' if batching else 'off'} | {r['qps']:.0f} | "
      f"{r['failures']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
    )


if __name__ == "__main__":
  launch.run_module(main)
