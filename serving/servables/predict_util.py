"""Predict: validates a PredictRequest against a signature and runs it."""

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import predict_pb2

from serving import errors
from serving.servables import saved_model_bundle, tensor_util

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


def _joined(keys) -> str:
  return ",".join(sorted(keys))


def check_shape(alias: str, array: np.ndarray, info: meta_graph_pb2.TensorInfo) -> None:
  """Raises INVALID_ARGUMENT if `array` can't be fed to `info`'s tensor."""
  if info.tensor_shape.unknown_rank or not info.HasField("tensor_shape"):
    return
  expected = [d.size for d in info.tensor_shape.dim]
  if not tensor_util.shape_fits(array.shape, expected):
    shape = ",".join("?" if e < 0 else str(e) for e in expected)
    raise errors.invalid_argument(
      f"Input {alias} has shape {list(array.shape)} but the signature expects [{shape}] (tensor {info.name})"
    )


def check_input_names(signature: meta_graph_pb2.SignatureDef, inputs: Mapping[str, tensor_pb2.TensorProto]) -> None:
  """Raises INVALID_ARGUMENT unless the request's input aliases are the signature's (all of them,
  unless it declares defaults): TF Serving's VerifyRequestInputsSize, which runs before any input is
  decoded or priced."""
  request_keys = set(inputs.keys())
  signature_keys = set(signature.inputs.keys())
  missing = signature_keys - request_keys
  extra = request_keys - signature_keys
  if len(request_keys) > len(signature_keys) or (missing - set(signature.defaults.keys())):
    raise errors.invalid_argument(
      f"input size does not match signature: {len(request_keys)}!="
      f"{len(signature_keys)} len({{{_joined(request_keys)}}}) != "
      f"len({{{_joined(signature_keys)}}}). Sent extra: "
      f"{{{_joined(extra)}}}. Missing but required: "
      f"{{{_joined(missing)}}}."
    )
  if extra:
    raise errors.invalid_argument(
      f"input tensor alias not found in signature: {min(extra)}. Inputs "
      f"expected to be in the set {{{_joined(signature_keys)}}}."
    )


def input_feeds(
  signature: meta_graph_pb2.SignatureDef, inputs: Mapping[str, tensor_pb2.TensorProto]
) -> dict[str, np.ndarray]:
  """Validates request inputs and returns feeds keyed by tensor name.

  As TF Serving's PreProcessPrediction, the input count must match the
  signature (unless it declares defaults), every alias must exist, and each
  tensor must decode with the signature's dtype. Beyond it, each shape must fit
  the signature's, which TF Serving leaves to the graph (serving/README.md,
  "Hardening").
  """
  check_input_names(signature, inputs)
  feeds = {}
  for index, alias in enumerate(sorted(inputs)):
    info = signature.inputs[alias]
    proto = inputs[alias]
    if proto.dtype != info.dtype:
      raise errors.invalid_argument(
        f"Expects arg[{index}] to be {tensor_util.dtype_name(info.dtype)} "
        f"but {tensor_util.dtype_name(proto.dtype)} is provided "
        f"(input {alias})"
      )
    array = tensor_util.to_ndarray(proto, alias)
    check_shape(alias, array, info)
    if info.name in feeds:
      # Two aliases of one tensor: TF's session refuses the run (the native path's answer) rather
      # than run with whichever value came last.
      raise errors.invalid_argument(f'Endpoint "{info.name}" fed more than once.')
    feeds[info.name] = array
  return feeds


def output_targets(signature: meta_graph_pb2.SignatureDef, output_filter) -> tuple[list[str], list[str]]:
  """Returns (aliases, tensor names) to fetch, honouring `output_filter`."""
  aliases: list[str] = []
  for alias in output_filter:
    if alias not in signature.outputs:
      raise errors.invalid_argument(
        f"output tensor alias not found in signature: {alias} Outputs "
        f"expected to be in the set {{{_joined(signature.outputs.keys())}}}."
      )
    if alias in aliases:
      raise errors.invalid_argument(f"duplicate output tensor alias: {alias}")
    aliases.append(alias)
  if not aliases:
    aliases = sorted(signature.outputs.keys())
  return aliases, [signature.outputs[a].name for a in aliases]


class PreparedPredict(NamedTuple):
  """A validated PredictRequest, ready to run on its servable's session."""

  signature_name: str
  signature: meta_graph_pb2.SignatureDef
  feeds: dict[str, np.ndarray]
  aliases: list[str]
  fetches: list[str]


def prepare_predict(
  bundle: saved_model_bundle.SavedModelBundle, request: predict_pb2.PredictRequest, method_name_check: bool = False
) -> PreparedPredict:
  """Resolves the signature and validates and decodes the request's inputs.

  Raises:
    ServingError: with TF Serving's code, naming the servable and signature.
  """
  name, signature = bundle.signature(request.model_spec.signature_name)
  try:
    if method_name_check and signature.method_name not in (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD):
      raise errors.internal(
        "Expected prediction signature method_name to be one of "
        f"{{{PREDICT_METHOD}, {CLASSIFY_METHOD}, {REGRESS_METHOD}}}. Was: "
        f"{signature.method_name}"
      )
    feeds = input_feeds(signature, request.inputs)
    aliases, fetches = output_targets(signature, request.output_filter)
  except Exception as e:  # Every failure names the servable and signature.
    raise errors.from_exception(e, bundle.context(name)) from e
  return PreparedPredict(name, signature, feeds, aliases, fetches)


def predict_response(
  bundle: saved_model_bundle.SavedModelBundle,
  prepared: PreparedPredict,
  values: Sequence[np.ndarray],
  as_tensor_content: bool = False,
) -> predict_pb2.PredictResponse:
  """Builds the PredictResponse from the fetched values."""
  response = predict_pb2.PredictResponse()
  bundle.fill_model_spec(response.model_spec, prepared.signature_name)
  outputs = prepared.signature.outputs
  for alias, value in zip(prepared.aliases, values):
    response.outputs[alias].CopyFrom(tensor_util.to_tensor_proto(value, outputs[alias].dtype, as_tensor_content))
  return response


def run_predict(
  bundle: saved_model_bundle.SavedModelBundle,
  request: predict_pb2.PredictRequest,
  timeout_ms: int | None = None,
  method_name_check: bool = False,
  as_tensor_content: bool = False,
) -> predict_pb2.PredictResponse:
  """Runs a PredictRequest on one loaded servable.

  Args:
    bundle: The servable resolved from the request's ModelSpec.
    request: The request.
    timeout_ms: Milliseconds to the call's deadline, if any (a batch wait's bound).
    method_name_check: Reject signatures whose method is not
      predict/classify/regress (TF Serving's
      --enable_signature_method_name_check).
    as_tensor_content: Answer with tensor_content instead of typed fields.

  Returns:
    The PredictResponse.
  """
  prepared = prepare_predict(bundle, request, method_name_check)
  try:
    values = bundle.runner(prepared.feeds, prepared.fetches, timeout_ms)
  except Exception as e:  # Every failure names the servable and signature.
    raise errors.from_exception(e, bundle.context(prepared.signature_name)) from e
  return predict_response(bundle, prepared, values, as_tensor_content)
