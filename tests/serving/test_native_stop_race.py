"""Stopping the native server while calls wait for a batch never aborts the process.

gRPC aborts on an op started on a shut-down completion queue. The server's shutdown returns before
every cancelled call's done tag is polled, so a cancellation handled after the queue was shut down
answered its call there, and the process died (`assertion failed: grpc_cq_begin_op`). The stops
run in a child process, so that an abort fails this test rather than the test runner.
"""

import os
import subprocess
import sys
import textwrap

import serving_testlib as lib

from tests import conftest as root_conftest

_STOPS = 12

_SCRIPT = textwrap.dedent(
  """
  import pathlib, sys
  import grpc, tensorflow as tf
  from tensorflow_serving.apis import predict_pb2
  import serving_testlib as lib

  root = pathlib.Path(sys.argv[1])
  lib.write_tf2_half_plus_two(str(root / "m" / "1"))
  (root / "batching.config").write_text("max_batch_size { value: 2 } batch_timeout_micros { value: 3600000000 }")
  codes = set()
  for i in range(int(sys.argv[2])):
    server = lib.InProcessServer(native="on", model_name="m", model_base_path=str(root / "m"), enable_batching=True,
                                 batching_parameters_file=str(root / "batching.config"))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0], dtype=tf.float32))
    future = server.predict.Predict.future(request, timeout=10)  # Alone: its batch is never full.
    server.server.stop(grace_seconds=(0, 0.001, 0.01)[i % 3])
    try:
      future.result()
      codes.add("OK")
    except grpc.RpcError as e:
      codes.add(e.code().name)
    server.channel.close()
  print(" ".join(sorted(codes)))
  """
)


def test_stops_with_calls_waiting_for_a_batch_never_abort(tmp_path):
  root_conftest.require_native()
  script = tmp_path / "stops.py"
  script.write_text(_SCRIPT)
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join([lib.REPO_ROOT, here]))
  done = subprocess.run(
    [sys.executable, str(script), str(tmp_path), str(_STOPS)], env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
  # The drain at the stop's start runs the waiting call, or the stop's cancellation ends it. Or the
  # client never got the call through: in a few stops in a hundred under load, its connection was
  # still in its handshake when the stop closed it, and grpcio left its end in CLOSE-WAIT until the
  # call's deadline (the server's end in FIN-WAIT-2, no native call alive).
  assert set(done.stdout.split()) <= {"OK", "UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"}, done.stdout
