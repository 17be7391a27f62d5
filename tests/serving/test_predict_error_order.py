"""Which Predict error a bad request gets does not depend on the request map's iteration order (which
varies from one process to the next), and follows TF Serving's order: the inputs' names first, then
their values, on both paths."""

import grpc
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2

from tests import conftest as root_conftest

_ALIASES = [f"in{i:02d}" for i in range(40)]


class _ManyInputs(tf.Module):
  @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name=alias) for alias in _ALIASES])
  def serve(self, *inputs):
    return {"sum": tf.add_n(list(inputs))}


@pytest.fixture(scope="module", params=["off", "on"])
def server(request, tmp_path_factory):
  if request.param == "on":
    root_conftest.require_native()
  base = tmp_path_factory.mktemp("models")
  model = _ManyInputs()
  tf.saved_model.save(model, str(base / "m" / "1"), signatures={"serving_default": model.serve})
  lib.write_tf2_half_plus_two(str(base / "half" / "1"))
  config = base / "models.config"
  config.write_text(
    "model_config_list { "
    + " ".join(
      f'config {{ name: "{name}" base_path: "{base / name}" model_platform: "tensorflow" }}' for name in ("m", "half")
    )
    + " }"
  )
  started = lib.InProcessServer(model_config_file=str(config), native=request.param)
  yield started
  started.stop()


def test_the_first_malformed_input_by_alias_is_the_one_named(server):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "m"
  for alias in reversed(_ALIASES):
    tensor = tensor_pb2.TensorProto(dtype=1, tensor_content=b"\x00" * 3)  # 3 bytes: no whole float.
    tensor.tensor_shape.dim.add(size=1)
    request.inputs[alias].CopyFrom(tensor)
  code, message = lib.grpc_code(server.predict.Predict, request)
  assert code == grpc.StatusCode.INVALID_ARGUMENT
  assert message.startswith("tensor parsing error: in00: tensor_content holds 3 bytes"), message


@pytest.mark.parametrize(
  "extra",
  [
    tensor_pb2.TensorProto(dtype=1, float_val=[1.0] * 5000, tensor_shape={"dim": [{"size": 5000}]}),
    tensor_pb2.TensorProto(dtype=1, tensor_content=b"\x00" * 3, tensor_shape={"dim": [{"size": 1}]}),
    tensor_pb2.TensorProto(dtype=1, tensor_shape={"dim": [{"size": -1}]}),
  ],
  ids=["large", "short_content", "negative_dim"],
)
def test_an_unknown_input_is_named_before_any_input_is_priced_or_decoded(server, extra):
  """TF Serving's VerifyRequestInputsSize comes first: an input the signature lacks is INVALID_ARGUMENT
  naming it, not the request-size limit (RESOURCE_EXHAUSTED) or a parsing error of its value."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "half"
  request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0]))
  request.inputs["z"].CopyFrom(extra)
  code, message = lib.grpc_code(server.predict.Predict, request)
  assert code == grpc.StatusCode.INVALID_ARGUMENT, message
  assert message.startswith("input size does not match signature: 2!=1 len({x,z}) != len({x}). Sent extra: {z}"), (
    message
  )
