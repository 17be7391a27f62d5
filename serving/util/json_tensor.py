"""JSON <-> tensors and tf.Examples for the REST API, in TF Serving's formats.

Requests use the row format (`"instances"`) or the columnar format
(`"inputs"`); binary strings travel as `{"b64": "..."}`. Responses answer
`"predictions"` or `"outputs"` respectively; string outputs whose alias ends
in `_bytes` (or that are not UTF-8) are base64-encoded.
"""

import base64
import binascii
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from serving import errors
from serving.servables import request_limits, tensor_util

B64_KEY = "b64"
# The largest rank a request tensor may have (NumPy's, which decodes it):
# deeper JSON lists are refused, and stopping there keeps the recursion shallow.
MAX_RANK = tensor_util.MAX_RANK
# What a tf.Example int64_list holds.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def short_repr(value: Any, limit: int = 80) -> str:
  """A bounded repr for error messages (deep nesting can't recurse out)."""
  try:
    text = repr(value)
  except RecursionError:
    return "<too deeply nested>"
  return text if len(text) <= limit else text[:limit] + "..."


_ASCII_WHITESPACE = re.compile("[ \t\n\v\f\r]")


def _is_b64(value: Any) -> bool:
  return isinstance(value, dict) and len(value) == 1 and B64_KEY in value


def _decode_b64(value: dict[str, Any]) -> bytes:
  encoded = value[B64_KEY]
  if not isinstance(encoded, str):
    raise errors.invalid_argument("'b64' value must be a string")
  # TF Serving decodes with absl::Base64Unescape, which skips ASCII whitespace (MIME encoders break
  # lines), takes "." for "=" as padding, and makes padding optional (when present it must be
  # right); Python's decoder does none of these.
  encoded = _ASCII_WHITESPACE.sub("", encoded)
  unpadded = encoded.rstrip("=.")
  encoded = unpadded + "=" * (len(encoded) - len(unpadded))
  if "=" not in encoded and len(encoded) % 4 > 1:
    encoded += "=" * (-len(encoded) % 4)
  try:
    return base64.b64decode(encoded, validate=True)
  except (binascii.Error, ValueError) as e:
    raise errors.invalid_argument(f"Unable to base64 decode the value of 'b64': {e}") from e


def _leaf(value: Any, dtype: int, alias: str) -> Any:
  """Checks one JSON scalar against the tensor's dtype and converts it."""
  if dtype == types_pb2.DT_STRING:
    if isinstance(value, str):
      return value.encode("utf-8")
    if _is_b64(value):
      return _decode_b64(value)
  elif dtype == types_pb2.DT_BOOL:
    if isinstance(value, bool):
      return value
  elif dtype in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return value
    if value in ("NaN", "Infinity", "-Infinity"):
      return float(value.replace("Infinity", "inf"))
  elif isinstance(value, int) and not isinstance(value, bool):
    return value
  raise errors.invalid_argument(
    f"Unable to convert JSON value {short_repr(value)} of input {alias} to {tf.as_dtype(dtype).name}"
  )


def _flatten(value: Any, dtype: int, alias: str, depth: int = 0) -> tuple[list[int], list]:
  """Returns (shape, flat values) of a rectangular nested JSON list."""
  if isinstance(value, list):
    if depth >= MAX_RANK:
      raise errors.invalid_argument(
        f"Input {alias} nests lists deeper than {MAX_RANK} levels, the largest rank a request tensor may have"
      )
    if not value:
      return [0], []
    shapes, flat = None, []
    for item in value:
      shape, values = _flatten(item, dtype, alias, depth + 1)
      if shapes is None:
        shapes = shape
      elif shape != shapes:
        raise errors.invalid_argument(
          f"Input {alias} is not a rectangular tensor: found elements of shapes {shapes} and {shape}"
        )
      flat.extend(values)
    return [len(value)] + shapes, flat
  return [], [_leaf(value, dtype, alias)]


def json_to_ndarray(value: Any, info: meta_graph_pb2.TensorInfo, alias: str) -> np.ndarray:
  """Converts a JSON value to an array of the signature input's dtype."""
  return _to_ndarray(*_flatten(value, info.dtype, alias), info, alias)


def _cost(flat: list, dtype: int) -> request_limits.Cost:
  """What a flattened JSON input expands to (strings: their lengths)."""
  if dtype == types_pb2.DT_STRING:
    return request_limits.Cost(len(flat), sum(map(len, flat)))
  return request_limits.Cost(len(flat), len(flat) * tf.as_dtype(dtype).size)


def _to_ndarray(shape: list[int], flat: list, info: meta_graph_pb2.TensorInfo, alias: str) -> np.ndarray:
  np_dtype = tf.as_dtype(info.dtype).as_numpy_dtype
  if info.dtype == types_pb2.DT_STRING:
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
  else:
    try:
      with np.errstate(over="raise"):  # 1e300 is no float32: reject it.
        array = np.asarray(flat, dtype=np_dtype)
    except (OverflowError, ValueError, FloatingPointError) as e:
      raise errors.invalid_argument(f"Unable to convert input {alias} to {tf.as_dtype(info.dtype).name}: {e}") from e
  return array.reshape(shape)


def _input_infos(signature: meta_graph_pb2.SignatureDef, names) -> dict:
  infos = {}
  for name in names:
    if name not in signature.inputs:
      raise errors.invalid_argument(
        f"Failed to process element: {name} key not found in signature inputs {{{','.join(sorted(signature.inputs))}}}"
      )
    infos[name] = signature.inputs[name]
  return infos


CostCheck = Callable[[dict[str, request_limits.Cost]], None]


def parse_predict_body(
  body: Mapping[str, Any], signature: meta_graph_pb2.SignatureDef, check: CostCheck | None = None
) -> tuple[dict[str, np.ndarray], bool]:
  """Parses a :predict body into {alias: array}; returns (inputs, row_format).

  `check`, if given, sees every input's cost ({alias: Cost}) once the JSON
  is walked and before any array is built, and raises to refuse the request.
  """
  values, row_format = _predict_values(body, signature)
  flattened = {alias: _flatten(value, signature.inputs[alias].dtype, alias) for alias, value in values.items()}
  if check is not None:
    check({alias: _cost(flat, signature.inputs[alias].dtype) for alias, (_, flat) in flattened.items()})
  return {
    alias: _to_ndarray(shape, flat, signature.inputs[alias], alias) for alias, (shape, flat) in flattened.items()
  }, row_format


def _predict_values(body: Mapping[str, Any], signature: meta_graph_pb2.SignatureDef) -> tuple[dict[str, Any], bool]:
  """Picks each input's JSON value out of a :predict body."""
  has_instances, has_inputs = "instances" in body, "inputs" in body
  if has_instances == has_inputs:
    raise errors.invalid_argument(
      "Not both 'inputs' and 'instances' keys may be present" if has_inputs else "Missing 'inputs' or 'instances' key"
    )
  if has_inputs:
    value = body["inputs"]
    if isinstance(value, dict) and not _is_b64(value):
      # As TF Serving does, the signature's inputs are read and must all be there; other keys (a
      # client's request id, say) are ignored.
      missing = sorted(set(signature.inputs) - set(value))
      if missing:
        raise errors.invalid_argument(f"Missing named input: {missing[0]} in 'inputs' object.")
      return {alias: v for alias, v in value.items() if alias in signature.inputs}, False
    return {_single_input(signature): value}, False
  instances = body["instances"]
  if not isinstance(instances, list) or not instances:
    raise errors.invalid_argument("'instances' must be a non-empty list of instances")
  named = [isinstance(i, dict) and not _is_b64(i) for i in instances]
  if all(named):
    keys = list(instances[0])  # In the client's order, so errors name the same input every time.
    if any(i.keys() != instances[0].keys() for i in instances):
      raise errors.invalid_argument("Failed to process element: every instance must have the same named inputs")
    _input_infos(signature, keys)
    return {a: [i[a] for i in instances] for a in keys}, True
  if any(named):
    raise errors.invalid_argument("Instances mix named (object) and unnamed values")
  return {_single_input(signature): instances}, True


def _single_input(signature: meta_graph_pb2.SignatureDef) -> str:
  if len(signature.inputs) != 1:
    raise errors.invalid_argument(
      f"The signature has more than one input {{{','.join(sorted(signature.inputs))}}}: name each input"
    )
  return next(iter(signature.inputs))


def _float32_shortest(array: np.ndarray) -> np.ndarray:
  # Python floats print float32 values with double precision noise (2.1 ->
  # 2.0999999046325684); TF Serving prints the shortest float32 form.
  return array.astype(str).astype(np.float64)


def _string_value(value: bytes, as_b64: bool) -> Any:
  if not as_b64:
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      pass
  return {B64_KEY: base64.b64encode(value).decode("ascii")}


def ndarray_to_json(array: np.ndarray, alias: str) -> Any:
  """Converts an output array to JSON values."""
  array = np.asarray(array)
  if array.dtype == object or array.dtype.kind == "S":
    as_b64 = alias.endswith("_bytes")
    flat = [_string_value(v if isinstance(v, bytes) else str(v).encode(), as_b64) for v in array.reshape(-1)]
    result = np.empty(len(flat), dtype=object)
    result[:] = flat
    return result.reshape(array.shape).tolist()
  if array.dtype == np.float32 or array.dtype == np.float16:
    return _float32_shortest(array).tolist()
  if array.dtype.kind == "c":
    raise errors.invalid_argument(f"Output {alias} is complex, which JSON can't represent")
  return array.tolist()


def predict_response_json(outputs: Mapping[str, np.ndarray], row_format: bool) -> dict[str, Any]:
  """Builds {"predictions": ...} (row) or {"outputs": ...} (columnar)."""
  if not row_format:
    if len(outputs) == 1:
      alias, value = next(iter(outputs.items()))
      return {"outputs": ndarray_to_json(value, alias)}
    return {"outputs": {a: ndarray_to_json(v, a) for a, v in outputs.items()}}
  batch = None
  for alias, value in outputs.items():
    size = value.shape[0] if np.ndim(value) else None
    if size is None or (batch is not None and size != batch):
      raise errors.invalid_argument(
        f"Output tensor {alias} has inconsistent batch size: row format "
        "needs every output to share dimension 0; use the columnar "
        "'inputs' format"
      )
    batch = size
  converted = {a: ndarray_to_json(v, a) for a, v in outputs.items()}
  if len(converted) == 1:
    return {"predictions": next(iter(converted.values()))}
  return {"predictions": [{a: converted[a][i] for a in converted} for i in range(batch or 0)]}


def _feature_kind(name: str, value: Any) -> str:
  """The tf.Example list a JSON feature value goes to, as TF Serving decides it (json_tensor.cc).

  true/false are int64 1/0; a number written with a fraction or an exponent is a float.
  """
  if isinstance(value, (bool, int)):
    return "int64"
  if isinstance(value, float):
    return "float"
  if isinstance(value, str) or _is_b64(value):
    return "bytes"
  raise errors.invalid_argument(f"Feature: {name} has element with unexpected JSON type: {short_repr(value)}")


def _feature(name: str, value: Any) -> feature_pb2.Feature:
  values = value if isinstance(value, list) else [value]
  feature = feature_pb2.Feature()
  if not values:
    return feature
  kinds = [_feature_kind(name, v) for v in values]
  kind = kinds[0]
  if any(k != kind for k in kinds):
    other = next(k for k in kinds if k != kind)
    raise errors.invalid_argument(
      f"Unexpected element type in feature: {name} expecting type: {kind}, got a {other} value "
      f"(all of a feature's values must be of one type: write floats with a decimal point)"
    )
  if kind == "int64":
    outside = [v for v in values if not _INT64_MIN <= v <= _INT64_MAX]
    if outside:
      raise errors.invalid_argument(f"Feature {name}: {short_repr(outside[0])} is out of the int64 range")
    feature.int64_list.value.extend(int(v) for v in values)
  elif kind == "float":
    feature.float_list.value.extend(values)
  else:
    feature.bytes_list.value.extend(_decode_b64(v) if _is_b64(v) else v.encode("utf-8") for v in values)
  return feature


def _example(features: Any, what: str) -> example_pb2.Example:
  if not isinstance(features, dict):
    raise errors.invalid_argument(f"{what} must be a JSON object")
  example = example_pb2.Example()
  for name, value in features.items():
    example.features.feature[name].CopyFrom(_feature(name, value))
  return example


def parse_examples_body(body: Mapping[str, Any]) -> input_pb2.Input:
  """Parses a :classify/:regress body ("examples", optional "context")."""
  examples = body.get("examples")
  if not isinstance(examples, list) or not examples:
    raise errors.invalid_argument("'examples' must be a non-empty list of objects")
  model_input = input_pb2.Input()
  if "context" in body:
    target = model_input.example_list_with_context
    target.context.CopyFrom(_example(body["context"], "'context'"))
  else:
    target = model_input.example_list
  for example in examples:
    target.examples.add().CopyFrom(_example(example, "Each example"))
  return model_input


def _json_float(value: float) -> Any:
  return float(np.float32(value).astype(str)) if math.isfinite(value) else (value)


def classification_json(result: classification_pb2.ClassificationResult) -> dict[str, Any]:
  """{"results": [[[label, score], ...], ...]} as TF Serving answers."""
  return {"results": [[[c.label, _json_float(c.score)] for c in cl.classes] for cl in result.classifications]}


def regression_json(result: regression_pb2.RegressionResult) -> dict[str, Any]:
  """{"results": [value, ...]} as TF Serving answers."""
  return {"results": [_json_float(r.value) for r in result.regressions]}
