"""A trivial PredictionService that answers every Predict with one fixed response: the transport floor.

It runs TF Serving's gRPC API on a thread-pool `grpc.server`, as fgr-serve does, but does no work, so
its latency and throughput are what gRPC in Python costs on this machine. Optionally it stalls once
(all workers blocked) to show what coordinated-omission correction catches.

  python -m bench.echo_server --port=0 --port_file=/tmp/echo.port --k=100
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import grpc
import numpy as np
import tensorflow as tf
from absl import flags
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from cli import launch
from serving.util import stop_signals


def fixed_response(k: int = 100) -> predict_pb2.PredictResponse:
  """A response shaped like the full graph's: `ids` [1, k] strings and `scores` [1, k] float32."""
  response = predict_pb2.PredictResponse()
  response.model_spec.name = "echo"
  response.model_spec.version.value = 1
  response.outputs["ids"].CopyFrom(tf.make_tensor_proto(np.array([[f"ad{i:07d}".encode() for i in range(k)]])))
  response.outputs["scores"].CopyFrom(tf.make_tensor_proto(np.linspace(1, 0, k, dtype=np.float32)[None]))
  return response


class EchoServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
  """Answers Predict with a fixed response; can stall every worker once.

  Args:
    response: what every Predict returns.
    stall_after: after this many requests, the next one holds a server-wide lock for `stall_seconds`
      (with one worker thread, every request queues behind it). None never stalls.
    stall_seconds: length of that stall.
  """

  def __init__(self, response: predict_pb2.PredictResponse, stall_after: int | None = None, stall_seconds: float = 0.0):
    self._response = response
    self._stall_after, self._stall_seconds = stall_after, stall_seconds
    self._count = 0
    self._lock = threading.Lock()

  def Predict(self, request, context):  # pylint: disable=invalid-name
    if self._stall_after is not None:
      with self._lock:
        self._count += 1
        if self._count == self._stall_after + 1:
          time.sleep(self._stall_seconds)
    return self._response


def start(
  port: int = 0,
  max_workers: int = 8,
  response: predict_pb2.PredictResponse | None = None,
  stall_after: int | None = None,
  stall_seconds: float = 0.0,
) -> tuple[grpc.Server, int]:
  """Starts an echo server on 127.0.0.1; returns (server, port)."""
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=max_workers))
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
    EchoServicer(response or fixed_response(), stall_after, stall_seconds), server
  )
  bound = server.add_insecure_port(f"127.0.0.1:{port}")
  server.start()
  return server, bound


def serve_until_signalled(server: grpc.Server, port: int, port_file: str | None) -> None:
  """Publishes `grpc=<port>` in port_file (atomically), then serves until SIGTERM or SIGINT."""
  with stop_signals.StopSignals() as signals:  # Caught before anyone can read the port.
    if port_file:
      with open(port_file + ".tmp", "w") as f:
        f.write(f"grpc={port}\n")
      os.replace(port_file + ".tmp", port_file)
    signals.wait()
  server.stop(grace=2).wait()


def main(argv: list[str]) -> None:
  del argv
  server, port = start(FLAGS.port, FLAGS.max_workers, fixed_response(FLAGS.k))
  serve_until_signalled(server, port, FLAGS.port_file)


FLAGS = flags.FLAGS

if __name__ == "__main__":
  # Defined only when run as a program, so importing the servicer defines no flags (fgr-serve owns --port).
  flags.DEFINE_integer("port", 0, "gRPC port on 127.0.0.1 (0 picks a free one).")
  flags.DEFINE_string("port_file", None, "Writes `grpc=<port>` here once serving.")
  flags.DEFINE_integer("max_workers", 8, "Server worker threads.")
  flags.DEFINE_integer("k", 100, "Candidates in the fixed response.")
  launch.run_module(main)
