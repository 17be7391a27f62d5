"""One-off queries against a TF Serving-compatible server: requests from raw features, answers as rows.

The flag-free half of fgr-query (`clients/query_cli.py`). It asks the server for the signature's inputs
(GetModelMetadata, which stock TF Serving answers too), so a request that leaves out string features
sends them empty, as the model's own padding; and it prints any signature's outputs, not only the full
graph's `ids` and `scores`.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2, predict_pb2, prediction_service_pb2_grpc

from clients.loadtest import request_source


class QueryError(Exception):
  """A call the server refused, or a server that did not answer: the message says which and why.

  `code` is the call's gRPC status, where one failed (None otherwise).
  """

  def __init__(self, message: str, code: grpc.StatusCode | None = None):
    super().__init__(message)
    self.code = code


def model_spec(model_name: str, signature_name: str, version: int | None = None) -> model_pb2.ModelSpec:
  spec = model_pb2.ModelSpec(name=model_name, signature_name=signature_name)
  if version is not None:
    spec.version.value = version
  return spec


def wait_for_server(channel: grpc.Channel, address: str, seconds: float) -> None:
  """Returns once the channel connects; QueryError after `seconds` (a server still starting, or none)."""
  try:
    grpc.channel_ready_future(channel).result(timeout=seconds)
  except grpc.FutureTimeoutError:
    raise QueryError(f"No server answered at {address} within {seconds:g} s") from None


def signature_inputs(
  stub: prediction_service_pb2_grpc.PredictionServiceStub, spec: model_pb2.ModelSpec, timeout: float
) -> dict[str, meta_graph_pb2.TensorInfo]:
  """The signature's inputs, from the server's GetModelMetadata."""
  request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
  request.model_spec.CopyFrom(spec)
  request.model_spec.ClearField("signature_name")  # Metadata covers every signature of the version.
  try:
    response = stub.GetModelMetadata(request, timeout=timeout)
  except grpc.RpcError as e:
    raise QueryError(f"GetModelMetadata failed: {e.code().name}: {e.details()}", e.code()) from None
  signatures = get_model_metadata_pb2.SignatureDefMap()
  response.metadata["signature_def"].Unpack(signatures)
  name = spec.signature_name or "serving_default"
  if name not in signatures.signature_def:
    # Without the SavedModel's own entries (`__saved_model_init_op`), which no client calls.
    known = ", ".join(sorted(n for n in signatures.signature_def if not n.startswith("__")))
    raise QueryError(f"Model {spec.name} has no signature {name!r}; it has: {known}")
  return dict(signatures.signature_def[name].inputs)


def complete_features(features: dict[str, Any], inputs: dict[str, meta_graph_pb2.TensorInfo]) -> dict[str, Any]:
  """`features` plus every string input it leaves out, empty: "" for a scalar or [B] input, [""] for [B, n].

  Empty strings are what the towers pad with, so a left-out history or query means none. A left-out
  history feature (`hist_*`) takes the length of the history the request gives, since the towers read
  `hist_*` as one entry per past click and refuse other lengths. A left-out string scalar (a knob such
  as `diversity`) goes as "" of its own shape, for the graph to judge: as [""] it was refused for its
  shape, [1] against [], which named no knob. Inputs of other types stay missing, for the server to name.
  """
  completed = dict(features)
  history = [value for name, value in features.items() if name.startswith(_HISTORY_PREFIX)]
  for name, info in inputs.items():
    if name in completed or info.dtype != types_pb2.DT_STRING:
      continue
    rank = None if info.tensor_shape.unknown_rank else len(info.tensor_shape.dim)
    if rank in (0, 1):
      completed[name] = ""
    elif name.startswith(_HISTORY_PREFIX) and history:
      completed[name] = _empty_like(history[0])
    else:
      completed[name] = [""]
  return completed


# The behaviour history's features (models/data/schema.py: hist_ids, hist_categories, hist_brands); the
# client does not import the models.
_HISTORY_PREFIX = "hist_"


def _empty_like(value: Any) -> Any:
  """A value of `value`'s nesting and lengths with "" everywhere (a request's row, or its rows)."""
  if isinstance(value, list):
    return [_empty_like(element) for element in value]
  return ""


def predict_request(
  features: dict[str, Any], spec: model_pb2.ModelSpec, inputs: dict[str, meta_graph_pb2.TensorInfo] | None = None
) -> predict_pb2.PredictRequest:
  """A batch-of-one PredictRequest for `spec`.

  An input the signature (`inputs`) declares takes its dtype, and its shape: a value for an input
  whose first dimension is the batch (-1) gets that dimension of 1; one for a fixed shape (a scalar
  knob such as `min_relevance`, a per-channel `channel_weights` [C]) goes as it is. Other features go
  as string tensors of [1] or [1, n] (`request_source.features_request`), for the server to judge.

  Raises:
    ValueError: naming the feature whose value its input's dtype cannot hold.
  """
  inputs = inputs or {}
  request = request_source.features_request({n: v for n, v in features.items() if n not in inputs})
  for name, value in features.items():
    if name not in inputs:
      continue
    info = inputs[name]
    dims = [] if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
    if info.tensor_shape.unknown_rank or (dims and dims[0] < 0):
      value = [value]
    dtype = tf.as_dtype(info.dtype)
    if dtype == tf.string:
      array = request_source.string_array(name, value)
    else:
      try:
        array = np.asarray(value, dtype=dtype.as_numpy_dtype)
      except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"feature {name!r}: not a value of dtype {dtype.name}, or an even list of them: {e}") from None
    request.inputs[name].CopyFrom(tf.make_tensor_proto(array, dtype=dtype))
  request.model_spec.CopyFrom(spec)
  return request


def typed_requests(
  feature_sets: list[dict[str, Any]],
  spec: model_pb2.ModelSpec,
  inputs: dict[str, meta_graph_pb2.TensorInfo],
  source: str,
) -> list[predict_pb2.PredictRequest]:
  """`predict_request` for each of a requests file's feature dicts (`complete_features` first).

  Raises:
    ValueError: naming `source`, the request's number in it (1 for the first) and the feature.
  """
  requests = []
  for number, features in enumerate(feature_sets, 1):
    try:
      requests.append(predict_request(complete_features(features, inputs), spec, inputs))
    except ValueError as e:
      raise ValueError(f"{source}: request {number}: {e}") from None
  return requests


def _json_value(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="backslashreplace")
  if isinstance(value, (np.floating, float)):
    return round(float(value), 5)
  return value.item() if isinstance(value, np.generic) else value


def answer_row(response: predict_pb2.PredictResponse, top: int | None) -> dict[str, list]:
  """The first row of every output, each cut to `top` values (None: all of them), as JSON-ready lists."""
  if top is not None and top < 1:
    raise ValueError(f"top must be >= 1 (or None for all values), got {top}")
  row = {}
  for name in sorted(response.outputs):
    proto = response.outputs[name]
    # TF's own decoding: tf.make_ndarray cannot read the tensor_content of a string tensor, which a
    # server started with --enable_serialization_as_tensor_content answers.
    values = tf.io.parse_tensor(proto.SerializeToString(), tf.as_dtype(proto.dtype)).numpy()
    first = values[0] if values.ndim else values
    flat = np.asarray(first).reshape(-1)[:top]
    row[name] = [_json_value(v) for v in flat]
  return row


def format_row(number: int, version: int, row: dict[str, list]) -> str:
  """A readable answer: the full graph's ranked ids and scores as a table, any other output as a list."""
  lines = [f"request {number} (model version {version}):"]
  if set(row) >= {"ids", "scores"}:
    for rank, (ad_id, score) in enumerate(zip(row["ids"], row["scores"]), 1):
      lines.append(f"  {rank:3d}  {ad_id:<20s} {score:.4f}")
    extra = {name: values for name, values in row.items() if name not in ("ids", "scores")}
  else:
    extra = row
  lines.extend(f"  {name}: {values}" for name, values in extra.items())
  return "\n".join(lines)
