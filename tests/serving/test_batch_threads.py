"""Where batches run their ops, on both paths: in their batch thread unless the session config asks
for TF's pool.

With --tensorflow_inter_op_parallelism left at 0 (auto), a batch runs its ops in the batch thread
that took it, as an unbatched request runs in the thread that runs it; N > 0 hands every op to TF's
inter-op pool of N threads. Both must answer every call of a full batch, each with its own rows.
"""

from concurrent import futures

import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow_serving.apis import predict_pb2

from serving.servables import saved_model_bundle

_CALLS = 4


@pytest.mark.parametrize("inter_op", [None, 0, -1])
def test_auto_and_negative_inter_op_run_in_the_callers_thread(inter_op):
  config = None if inter_op is None else config_pb2.ConfigProto(inter_op_parallelism_threads=inter_op)
  assert saved_model_bundle.caller_thread(config)


def test_a_positive_inter_op_uses_tfs_pool():
  assert not saved_model_bundle.caller_thread(config_pb2.ConfigProto(inter_op_parallelism_threads=2))


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("inter_op", [0, 2])
def test_full_batches_answer_each_call_with_its_own_rows(tmp_path, inter_op):
  # The batch runs only once every call is in it: all of them are answered from one run.
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.batching_server(
    tmp_path,
    f"max_batch_size {{ value: {_CALLS} }} batch_timeout_micros {{ value: 3600000000 }}",
    session_config=config_pb2.ConfigProto(inter_op_parallelism_threads=inter_op),
  )
  try:

    def predict(x: float) -> list[float]:
      request = predict_pb2.PredictRequest()
      request.model_spec.name = "m"
      request.inputs["x"].CopyFrom(tf.make_tensor_proto([x], dtype=tf.float32))
      return list(server.predict.Predict(request, timeout=120).outputs["y"].float_val)

    with futures.ThreadPoolExecutor(_CALLS) as pool:
      answers = list(pool.map(predict, [float(i) for i in range(_CALLS)]))
    assert answers == [[i / 2 + 2] for i in range(_CALLS)]
  finally:
    server.stop()
