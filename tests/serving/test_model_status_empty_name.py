"""GetModelStatus for an empty model name answers NOT_FOUND, as TF Serving's GetModelStatusImpl."""

import grpc
import pytest
import serving_testlib as lib
from tensorflow_serving.apis import get_model_status_pb2


@pytest.mark.usefixtures("native")
def test_an_empty_model_name_is_not_found(tmp_path):
  """It was INVALID_ARGUMENT ("ModelSpec has no name specified."): TF Serving looks the name up like
  any other and finds no version (NOT_FOUND), so a client's handling of unknown models applies."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"))
  try:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = ""
    assert lib.grpc_code(server.model.GetModelStatus, request) == (
      grpc.StatusCode.NOT_FOUND,
      "Could not find any versions of model ",
    )
    request.model_spec.version.value = 1
    assert lib.grpc_code(server.model.GetModelStatus, request) == (
      grpc.StatusCode.NOT_FOUND,
      "Could not find version 1 of model ",
    )
    assert lib.grpc_code(server.model.GetModelStatus, get_model_status_pb2.GetModelStatusRequest()) == (
      grpc.StatusCode.INVALID_ARGUMENT,
      "Missing ModelSpec",
    )
  finally:
    server.stop()
