"""A graceful stop runs the calls waiting for a batch at once, on both --native paths, instead of
letting batch_timeout_micros outlast the grace and failing them UNAVAILABLE."""

import threading

import grpc
import numpy as np
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from tests import conftest as root_conftest


def _queued_tasks(server: lib.InProcessServer, native: str) -> int:
  if native == "on":
    from serving import native as native_lib  # pylint: disable=g-import-not-at-top

    return native_lib.module().live_counts()["tasks"]
  scheduler = server.server._scheduler  # pylint: disable=protected-access
  return sum(not queue.empty() for queue in scheduler._queues)  # pylint: disable=protected-access


@pytest.mark.parametrize("native", ["off", "on"])
def test_stop_answers_a_call_waiting_for_an_hour_long_batch(tmp_path, native):
  if native == "on":
    root_conftest.require_native()
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.batching_server(
    tmp_path, "max_batch_size { value: 8 } batch_timeout_micros { value: 3600000000 }", native=native
  )
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "m"
  request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0, 2.0], np.float32)))
  future = server.predict.Predict.future(request, timeout=120)
  lib.wait_for(lambda: _queued_tasks(server, native) > 0)
  # The batch would wait an hour: a stop whose grace (20 s) ran out first failed the call UNAVAILABLE.
  stopper = threading.Thread(target=server.server.stop, kwargs={"grace_seconds": 20})
  stopper.start()
  try:
    assert list(future.result().outputs["y"].float_val) == [2.5, 3.0]
  except grpc.RpcError as e:
    pytest.fail(f"the queued call got {e.code().name}: {e.details()}")
  finally:
    stopper.join()
    server.channel.close()
