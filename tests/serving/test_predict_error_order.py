"""Which input a Predict error names does not depend on the request map's iteration order (which
varies from one process to the next): malformed inputs are reported by alias order, on both paths."""

import grpc
import pytest
import serving_testlib as lib
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2

from tests import conftest as root_conftest


@pytest.mark.parametrize("native", ["off", "on"])
def test_the_first_malformed_input_by_alias_is_the_one_named(tmp_path, native):
  if native == "on":
    root_conftest.require_native()
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"), native=native)
  try:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    aliases = [f"in{i:02d}" for i in range(40)]
    for alias in reversed(aliases):
      tensor = tensor_pb2.TensorProto(dtype=1, tensor_content=b"\x00" * 3)  # 3 bytes: no whole float.
      tensor.tensor_shape.dim.add(size=1)
      request.inputs[alias].CopyFrom(tensor)
    code, message = lib.grpc_code(server.predict.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("tensor parsing error: in00: tensor_content holds 3 bytes"), message
  finally:
    server.stop()
