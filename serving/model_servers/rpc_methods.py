"""TF Serving's gRPC methods, as every gRPC front end dispatches them: bytes in, a ServingApi call, bytes out.

grpc_server.py registers them with grpc.aio; native_server.py answers the native port's fallbacks
with them, so that both front ends parse, run and fail alike.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from google.protobuf import message
from tensorflow_serving.apis import (
  classification_pb2,
  get_model_metadata_pb2,
  get_model_status_pb2,
  inference_pb2,
  model_management_pb2,
  predict_pb2,
  regression_pb2,
)

from serving import errors
from serving.model_servers.service_impl import ServingApi

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"


@dataclasses.dataclass(frozen=True)
class RpcMethod:
  """One method of TF Serving's gRPC services, as every gRPC front end
  dispatches it: its messages and the blocking `ServingApi` call answering it.

  Attributes:
    service: Full service name, e.g. "tensorflow.serving.PredictionService".
    name: Method name, e.g. "Predict".
    request_type: The request message class.
    response_type: The response message class.
    run: `run(api, request, timeout_ms)` returns the response or raises.
  """

  service: str
  name: str
  request_type: type[message.Message]
  response_type: type[message.Message]
  run: Callable[[ServingApi, Any, int | None], message.Message]

  @property
  def path(self) -> str:
    """The gRPC method path, "/<service>/<name>"."""
    return f"/{self.service}/{self.name}"

  def parse(self, data: bytes) -> message.Message:
    """The request from its wire bytes.

    Raises:
      ServingError: INVALID_ARGUMENT "Malformed <request type>: ..." for bytes
        that don't parse, as TF Serving answers any malformed input (grpcio
        alone would answer INTERNAL).
    """
    try:
      return self.request_type.FromString(data)
    except message.DecodeError as e:
      raise errors.invalid_argument(f"Malformed {self.request_type.DESCRIPTOR.name}: {e}") from e


# Every method of PredictionService and ModelService, as in their .proto files.
RPC_METHODS: tuple[RpcMethod, ...] = (
  RpcMethod(
    PREDICTION_SERVICE,
    "Classify",
    classification_pb2.ClassificationRequest,
    classification_pb2.ClassificationResponse,
    lambda api, request, timeout_ms: api.classify(request, timeout_ms),
  ),
  RpcMethod(
    PREDICTION_SERVICE,
    "Regress",
    regression_pb2.RegressionRequest,
    regression_pb2.RegressionResponse,
    lambda api, request, timeout_ms: api.regress(request, timeout_ms),
  ),
  RpcMethod(
    PREDICTION_SERVICE,
    "Predict",
    predict_pb2.PredictRequest,
    predict_pb2.PredictResponse,
    lambda api, request, timeout_ms: api.predict(request, timeout_ms),
  ),
  RpcMethod(
    PREDICTION_SERVICE,
    "MultiInference",
    inference_pb2.MultiInferenceRequest,
    inference_pb2.MultiInferenceResponse,
    lambda api, request, timeout_ms: api.multi_inference(request, timeout_ms),
  ),
  RpcMethod(
    PREDICTION_SERVICE,
    "GetModelMetadata",
    get_model_metadata_pb2.GetModelMetadataRequest,
    get_model_metadata_pb2.GetModelMetadataResponse,
    lambda api, request, timeout_ms: api.get_model_metadata(request),
  ),
  RpcMethod(
    MODEL_SERVICE,
    "GetModelStatus",
    get_model_status_pb2.GetModelStatusRequest,
    get_model_status_pb2.GetModelStatusResponse,
    lambda api, request, timeout_ms: api.get_model_status(request),
  ),
  RpcMethod(
    MODEL_SERVICE,
    "HandleReloadConfigRequest",
    model_management_pb2.ReloadConfigRequest,
    model_management_pb2.ReloadConfigResponse,
    lambda api, request, timeout_ms: api.reload_config(request),
  ),
)
