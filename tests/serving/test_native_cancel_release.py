"""A call cancelled while it waits for a batch frees its request at once on the native path.

The cancelled task keeps its rows in its batch until the batch runs (batch_timeout_micros, an hour
here), but its tensors and its request are dropped when the client cancels: before, a client
cancelling large calls held the server's memory for as long as the batch took to fill.
"""

import grpc
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from tests import conftest as root_conftest

_CANCELLED = 3


def test_cancelled_queued_calls_drop_their_tensors_and_the_batch_still_runs(tmp_path):
  root_conftest.require_native()
  from serving import native  # pylint: disable=g-import-not-at-top

  live = native.module().live_counts
  # One row per call: the batch runs once the last call fills it, cancelled rows included.
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.batching_server(
    tmp_path, f"max_batch_size {{ value: {_CANCELLED + 1} }} batch_timeout_micros {{ value: 3600000000 }}", native="on"
  )
  try:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0], dtype=tf.float32))
    tasks, tensors = live()["tasks"], live()["tensors"]
    for i in range(_CANCELLED):
      future = server.predict.Predict.future(request, timeout=120)
      lib.wait_for(lambda n=i: live()["tasks"] == tasks + n + 1)  # Queued in the batch.
      future.cancel()
    # Still queued, but holding nothing of their requests.
    lib.wait_for(lambda: live()["tensors"] == tensors, timeout=20)
    assert live()["tasks"] == tasks + _CANCELLED
    response = server.predict.Predict(request, timeout=120)
    assert list(response.outputs["y"].float_val) == [2.5]
    lib.wait_for(lambda: live()["tasks"] == tasks)
  except grpc.RpcError as e:
    raise AssertionError(f"{e.code()}: {e.details()}") from e
  finally:
    server.stop()
