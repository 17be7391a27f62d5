"""A request without a ModelSpec is INVALID_ARGUMENT "Missing ModelSpec", as TF Serving answers every
API (predict_impl.cc and its siblings); one with an empty name gets ServerCore's message."""

import grpc
import pytest
import serving_testlib as lib
from tensorflow_serving.apis import (
  classification_pb2,
  get_model_metadata_pb2,
  get_model_status_pb2,
  predict_pb2,
  regression_pb2,
)


@pytest.mark.usefixtures("native")
def test_requests_without_a_model_spec_are_told_so(tmp_path):
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"))
  try:
    calls = [
      (server.predict.Predict, predict_pb2.PredictRequest),
      (server.predict.Classify, classification_pb2.ClassificationRequest),
      (server.predict.Regress, regression_pb2.RegressionRequest),
      (server.predict.GetModelMetadata, get_model_metadata_pb2.GetModelMetadataRequest),
      (server.model.GetModelStatus, get_model_status_pb2.GetModelStatusRequest),
    ]
    for call, message in calls:
      assert lib.grpc_code(call, message()) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"), message
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = "serving_default"  # A ModelSpec, without a name.
    assert lib.grpc_code(server.predict.Predict, request) == (
      grpc.StatusCode.INVALID_ARGUMENT,
      "ModelSpec has no name specified.",
    )
  finally:
    server.stop()
