"""The RPC implementations shared by the gRPC and REST front ends."""

import time
from typing import Callable, Optional, TypeVar

from absl import logging
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import inference_pb2
from tensorflow_serving.apis import model_management_pb2
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import regression_pb2

from serving import errors
from serving.core import server_core
from serving.monitoring import metrics as metrics_lib
from serving.servables import classifier
from serving.servables import get_model_metadata
from serving.servables import multi_inference
from serving.servables import predict_util
from serving.servables import regressor

R = TypeVar("R")


class ServingApi:
  """Resolves servables, runs requests and records metrics.

  Every method raises `errors.ServingError` with TF Serving's code; anything
  else a request triggers is converted into one, so no request can take
  the server down.

  Args:
    core: The server core.
    metrics: Metrics to record into.
    method_name_check: TF Serving's --enable_signature_method_name_check.
    as_tensor_content: TF Serving's --enable_serialization_as_tensor_content.
  """

  def __init__(self, core: server_core.ServerCore, metrics: metrics_lib.Metrics,
               method_name_check: bool = False,
               as_tensor_content: bool = False):
    self.core = core
    self.metrics = metrics
    self._method_name_check = method_name_check
    self._as_tensor_content = as_tensor_content

  def _call(self, api: str, entrypoint: str, model_spec: model_pb2.ModelSpec,
            run: Callable[..., R]) -> R:
    start = time.monotonic()
    status = "OK"
    try:
      with self.core.servable_handle(model_spec) as bundle:
        return run(bundle)
    except Exception as e:
      error = errors.from_exception(e)
      if error.code.name in ("INTERNAL", "UNKNOWN"):
        logging.exception("%s failed", api)
      status = error.code.name
      raise error from e
    finally:
      self.metrics.record_request(model_spec.name, api, entrypoint, status,
                                  time.monotonic() - start)

  def predict(self, request: predict_pb2.PredictRequest,
              timeout_ms: Optional[int] = None, entrypoint: str = "GRPC"
              ) -> predict_pb2.PredictResponse:
    """PredictionService.Predict."""
    return self._call(
        "predict", entrypoint, request.model_spec,
        lambda b: predict_util.run_predict(
            b, request, timeout_ms, self._method_name_check,
            self._as_tensor_content))

  def classify(self, request: classification_pb2.ClassificationRequest,
               timeout_ms: Optional[int] = None, entrypoint: str = "GRPC"
               ) -> classification_pb2.ClassificationResponse:
    """PredictionService.Classify."""
    return self._call("classify", entrypoint, request.model_spec,
                      lambda b: classifier.run_classify(b, request, timeout_ms))

  def regress(self, request: regression_pb2.RegressionRequest,
              timeout_ms: Optional[int] = None, entrypoint: str = "GRPC"
              ) -> regression_pb2.RegressionResponse:
    """PredictionService.Regress."""
    return self._call("regress", entrypoint, request.model_spec,
                      lambda b: regressor.run_regress(b, request, timeout_ms))

  def multi_inference(self, request: inference_pb2.MultiInferenceRequest,
                      timeout_ms: Optional[int] = None,
                      entrypoint: str = "GRPC"
                      ) -> inference_pb2.MultiInferenceResponse:
    """PredictionService.MultiInference (one model, one version)."""
    multi_inference.validate_tasks(request)
    return self._call(
        "multi_inference", entrypoint, request.tasks[0].model_spec,
        lambda b: multi_inference.run_multi_inference(b, request, timeout_ms))

  def get_model_metadata(
      self, request: get_model_metadata_pb2.GetModelMetadataRequest,
      entrypoint: str = "GRPC"
  ) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """PredictionService.GetModelMetadata (signature_def)."""
    if not request.HasField("model_spec"):
      raise errors.invalid_argument("Missing ModelSpec")
    get_model_metadata.validate_request(request)
    return self._call("get_model_metadata", entrypoint, request.model_spec,
                      get_model_metadata.model_metadata)

  def get_model_status(self,
                       request: get_model_status_pb2.GetModelStatusRequest
                       ) -> get_model_status_pb2.GetModelStatusResponse:
    """ModelService.GetModelStatus."""
    if not request.HasField("model_spec"):
      raise errors.invalid_argument("Missing ModelSpec")
    return self.core.model_status(request.model_spec)

  def reload_config(self, request: model_management_pb2.ReloadConfigRequest
                    ) -> model_management_pb2.ReloadConfigResponse:
    """ModelService.HandleReloadConfigRequest.

    Returns the response with an OK status; raises on failure (the gRPC
    front end answers with the error code, as TF Serving does).
    """
    if request.config.WhichOneof("config") != "model_config_list":
      raise errors.invalid_argument(
          "ServerModelConfig type not supported by HandleReloadConfigRequest."
          " Only ModelConfigList is currently supported")
    self.core.reload_config(request.config)
    response = model_management_pb2.ReloadConfigResponse()
    response.status.error_code = 0
    return response
