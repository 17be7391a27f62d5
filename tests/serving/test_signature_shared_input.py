"""A Predict signature with two input aliases of one tensor: both --native paths refuse a request
feeding it twice, as TF's session does, instead of running on whichever value came last."""

import grpc
import numpy as np
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from tests import conftest as root_conftest


def _write_shared_input_model(export_dir: str) -> None:
  """TF1 export whose "two_in" signature names tensor x twice (aliases x and x_again): y = 2x."""
  graph = tf.Graph()
  with graph.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
    y = tf.identity(2.0 * x, name="y")
    info = tf.compat.v1.saved_model.utils.build_tensor_info
    signature = tf.compat.v1.saved_model.signature_def_utils.build_signature_def(
      inputs={"x": info(x), "x_again": info(x)}, outputs={"y": info(y)}, method_name="tensorflow/serving/predict"
    )
    with tf.compat.v1.Session(graph=graph) as session:
      builder = tf.compat.v1.saved_model.Builder(export_dir)
      builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={"two_in": signature})
      builder.save()


@pytest.mark.parametrize("native", ["off", "on"])
def test_feeding_one_tensor_through_two_aliases_is_invalid_argument(tmp_path, native):
  if native == "on":
    root_conftest.require_native()
  _write_shared_input_model(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"), native=native)
  try:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.model_spec.signature_name = "two_in"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float32)))
    request.inputs["x_again"].CopyFrom(tf.make_tensor_proto(np.array([5.0], np.float32)))
    code, message = lib.grpc_code(server.predict.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith('Endpoint "x:0" fed more than once.'), message
  finally:
    server.stop()
