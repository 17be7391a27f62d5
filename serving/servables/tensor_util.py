"""Conversion between TensorProto and NumPy, with TF Serving's wire choices."""

from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from serving import errors

# Largest number of elements we agree to materialise beyond the values a
# request actually carries (TF fills a short value list with its last value,
# so `shape: [1e12], float_val: 1` would otherwise exhaust memory).
_MAX_FILLED_ELEMENTS = 1 << 27
# The most elements a request tensor's shape may span, counting each zero dimension as 1, so that a
# zero-element shape (`[0, 2**62]`) is bounded too. Every dimension, and any array of that shape
# (2^44 bytes at 16 bytes an element), stays within what NumPy and TF can address. The same rule as
# the native DeclaredShape (serving/native/cc/tensor.cc, kMaxSpan): keep the two identical.
MAX_SHAPE_SPAN = 1 << 40
# The most dimensions a request tensor may declare: NumPy's limit, which the Python path decodes
# into (TF's own, TensorShape::MaxDimensions, is 254). A model input of more is not served here.
MAX_RANK = 64

# TensorProto's typed value field for each dtype, as Tensor::AsProtoField
# writes them. TF Serving answers Predict with these fields (not
# tensor_content), and many clients read e.g. `outputs["y"].float_val`.
_VALUE_FIELD = {
  types_pb2.DT_FLOAT: "float_val",
  types_pb2.DT_DOUBLE: "double_val",
  types_pb2.DT_INT8: "int_val",
  types_pb2.DT_INT16: "int_val",
  types_pb2.DT_INT32: "int_val",
  types_pb2.DT_UINT8: "int_val",
  types_pb2.DT_UINT16: "int_val",
  types_pb2.DT_INT64: "int64_val",
  types_pb2.DT_UINT32: "uint32_val",
  types_pb2.DT_UINT64: "uint64_val",
  types_pb2.DT_BOOL: "bool_val",
  types_pb2.DT_STRING: "string_val",
  types_pb2.DT_HALF: "half_val",
  types_pb2.DT_BFLOAT16: "half_val",
  types_pb2.DT_COMPLEX64: "scomplex_val",
  types_pb2.DT_COMPLEX128: "dcomplex_val",
}
VALUE_FIELDS = _VALUE_FIELD  # The dtypes requests may carry.
MAX_FILLED_ELEMENTS = _MAX_FILLED_ELEMENTS


def dtype_name(dtype_enum: int) -> str:
  """Returns TF's DataTypeString for an enum (e.g. "float" for DT_FLOAT)."""
  if dtype_enum in types_pb2.DataType.values():
    return types_pb2.DataType.Name(dtype_enum)[len("DT_") :].lower()
  return str(dtype_enum)


def shape_fits(shape: Sequence[int], dims: Sequence[int]) -> bool:
  """Whether a concrete `shape` fits `dims` of known rank (-1: any size)."""
  return len(shape) == len(dims) and all(d < 0 or d == s for d, s in zip(dims, shape))


def encode_string_list(values: Sequence[bytes]) -> bytes:
  """TF's wire form of a string tensor's `tensor_content` (port::EncodeStringList): every length as a
  varint32, then every string. Written here because TF has no Python API for it."""
  lengths = bytearray()
  for value in values:
    size = len(value)
    if size >= 1 << 32:
      raise ValueError(f"a string of {size} bytes does not fit a string tensor's tensor_content")
    while size >= 0x80:
      lengths.append(size & 0x7F | 0x80)
      size >>= 7
    lengths.append(size)
  return bytes(lengths) + b"".join(values)


def decode_string_list(content: bytes, count: int) -> list[bytes] | None:
  """The `count` strings of a string tensor's `tensor_content`, or None where TF's DecodeStringList
  refuses it (a length that is not a varint32, or lengths that do not add up to the bytes left)."""
  lengths, position = [], 0
  for _ in range(count):
    size = shift = 0
    while True:
      if position >= len(content) or shift > 28:
        return None
      byte = content[position]
      position += 1
      size |= (byte & 0x7F) << shift
      shift += 7
      if byte < 0x80:
        break
    if size >= 1 << 32:
      return None
    lengths.append(size)
  if sum(lengths) != len(content) - position:
    return None
  values = []
  for size in lengths:
    values.append(content[position : position + size])
    position += size
  return values


def supplied_values(proto: tensor_pb2.TensorProto) -> int:
  """Values a proto carries (bytes for tensor_content)."""
  if proto.tensor_content:
    return len(proto.tensor_content)
  field = _VALUE_FIELD.get(proto.dtype)
  return len(getattr(proto, field)) if field else 0


# NumPy types of the dtypes decoded without tf.make_ndarray (see below).
_NUMPY_TYPE = {
  types_pb2.DT_FLOAT: np.float32,
  types_pb2.DT_DOUBLE: np.float64,
  types_pb2.DT_INT8: np.int8,
  types_pb2.DT_INT16: np.int16,
  types_pb2.DT_INT32: np.int32,
  types_pb2.DT_INT64: np.int64,
  types_pb2.DT_UINT8: np.uint8,
  types_pb2.DT_UINT16: np.uint16,
  types_pb2.DT_UINT32: np.uint32,
  types_pb2.DT_UINT64: np.uint64,
  types_pb2.DT_BOOL: np.bool_,
}


def _decode_exact(proto: tensor_pb2.TensorProto, num_elements: int, alias: str) -> np.ndarray | None:
  """Decodes the common case, a proto carrying at least its elements.

  As TF's Tensor::FromProto: `tensor_content` wins over the typed field, and a typed field holding
  more values than the shape gives its first ones. tf.make_ndarray costs about 20 us per tensor in
  Python overhead, a noticeable share of a request with several small inputs; this path takes about
  2 us. Returns None for cases left to tf.make_ndarray (short value lists to fill,
  half/bfloat16/complex types).
  """
  if proto.dtype == types_pb2.DT_STRING:
    if proto.tensor_content:
      values = decode_string_list(proto.tensor_content, num_elements)
      if values is None:
        raise errors.invalid_argument(
          f"tensor parsing error: {alias}: tensor_content of {len(proto.tensor_content)} bytes does not "
          f"hold {num_elements} strings (each length as a varint32, then the strings)"
        )
    else:
      values = proto.string_val
      if len(values) < num_elements:
        return None
    array = np.empty(num_elements, dtype=object)
    array[:] = values if len(values) == num_elements else values[:num_elements]
    return array
  np_type = _NUMPY_TYPE.get(proto.dtype)
  if np_type is None:
    return None
  if proto.tensor_content:
    content = proto.tensor_content
    if len(content) != num_elements * np.dtype(np_type).itemsize:
      raise errors.invalid_argument(
        f"tensor parsing error: {alias}: tensor_content holds "
        f"{len(content)} bytes, not {num_elements} "
        f"{dtype_name(proto.dtype)} values"
      )
    return np.frombuffer(content, dtype=np_type)
  values = getattr(proto, _VALUE_FIELD[proto.dtype])
  if len(values) < num_elements:
    return None
  try:
    return np.array(values if len(values) == num_elements else values[:num_elements], dtype=np_type)
  except (OverflowError, ValueError) as e:
    raise errors.invalid_argument(f"tensor parsing error: {alias}: {e}") from e


def _first_values(proto: tensor_pb2.TensorProto, num_elements: int) -> tensor_pb2.TensorProto:
  """`proto` with its typed field cut to the shape's elements, which TF keeps of a longer list and
  tf.make_ndarray refuses. The proto itself when there is nothing to cut."""
  field = _VALUE_FIELD[proto.dtype]
  per_element = 2 if field in ("scomplex_val", "dcomplex_val") else 1  # (real, imaginary) pairs.
  if proto.tensor_content or len(getattr(proto, field)) <= per_element * num_elements:
    return proto
  cut = tensor_pb2.TensorProto()
  cut.CopyFrom(proto)
  del getattr(cut, field)[per_element * num_elements :]
  return cut


def declared_shape(proto: tensor_pb2.TensorProto, alias: str) -> tuple[list[int], int]:
  """A request TensorProto's declared dims and element count, checked as TF
  checks them before decoding.

  Raises:
    ServingError: INVALID_ARGUMENT for an unknown rank, a rank over MAX_RANK, a negative dimension,
      a shape spanning more than MAX_SHAPE_SPAN elements (zero dimensions counted as 1), or more
      elements than the proto supplies and decoding ever fills in (MAX_FILLED_ELEMENTS): a tensor
      TF can't allocate.
  """
  if proto.tensor_shape.unknown_rank:
    raise errors.invalid_argument(f"tensor parsing error: {alias}: tensor shape has unknown rank")
  dims = [d.size for d in proto.tensor_shape.dim]
  if len(dims) > MAX_RANK:
    raise errors.invalid_argument(
      f"tensor parsing error: {alias}: {len(dims)} dimensions, more than the {MAX_RANK} a request tensor may have"
    )
  elements = span = 1
  for d in dims:
    if d < 0:
      raise errors.invalid_argument(f"tensor parsing error: {alias}: negative dimension in shape {dims}")
    elements *= d
    span *= max(d, 1)
  if span > MAX_SHAPE_SPAN:
    raise errors.invalid_argument(
      f"tensor parsing error: {alias}: shape {dims} is too large: its nonzero dimensions multiply to more "
      f"than {MAX_SHAPE_SPAN} elements"
    )
  if elements > max(_MAX_FILLED_ELEMENTS, supplied_values(proto)):
    raise errors.invalid_argument(f"tensor parsing error: {alias}: shape {dims} has too many elements")
  return dims, elements


def to_ndarray(proto: tensor_pb2.TensorProto, alias: str) -> np.ndarray:
  """Decodes a request TensorProto.

  Args:
    proto: The tensor from the request.
    alias: Its input alias, named in error messages.

  Returns:
    The tensor as a NumPy array (object array of bytes for DT_STRING).

  Raises:
    ServingError: INVALID_ARGUMENT if the proto is malformed.
  """
  if proto.dtype not in _VALUE_FIELD:
    raise errors.invalid_argument(f"tensor parsing error: {alias}: unsupported dtype {dtype_name(proto.dtype)}")
  dims, num_elements = declared_shape(proto, alias)
  array = _decode_exact(proto, num_elements, alias)
  if array is not None:
    return array.reshape(dims)
  try:
    array = tf.make_ndarray(_first_values(proto, num_elements))
  except Exception as e:  # make_ndarray raises several types on bad protos.
    raise errors.invalid_argument(f"tensor parsing error: {alias}: {e}") from e
  if array.size != num_elements or list(array.shape) != dims:
    raise errors.invalid_argument(f"tensor parsing error: {alias}: {array.size} values do not fill shape {dims}")
  return array


def _shape_proto(shape: Iterable[int]) -> tensor_shape_pb2.TensorShapeProto:
  return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in shape])


def _as_bytes(value: object) -> bytes:
  """A string output's element as bytes (a str or number as its UTF-8 text)."""
  return value if isinstance(value, bytes) else str(value).encode("utf-8")


def to_tensor_proto(array: np.ndarray, dtype_enum: int, as_tensor_content: bool = False) -> tensor_pb2.TensorProto:
  """Encodes an output array the way TF Serving's Predict does.

  Args:
    array: The output value.
    dtype_enum: The DataType of the output tensor.
    as_tensor_content: Every value in `tensor_content`, as TF Serving's
      --enable_serialization_as_tensor_content answers (Tensor::AsProtoTensorContent, for every
      dtype and size: strings in TF's string-list form), instead of typed fields.

  Returns:
    The TensorProto.
  """
  array = np.asarray(array)
  field = _VALUE_FIELD.get(dtype_enum)
  if field is None:
    return tf.make_tensor_proto(array, dtype=tf.as_dtype(dtype_enum))
  proto = tensor_pb2.TensorProto(dtype=dtype_enum, tensor_shape=_shape_proto(array.shape))
  if as_tensor_content:
    if field == "string_val":
      proto.tensor_content = encode_string_list([_as_bytes(v) for v in array.reshape(-1).tolist()])
    else:
      proto.tensor_content = np.ascontiguousarray(array, dtype=tf.as_dtype(dtype_enum).as_numpy_dtype).tobytes()
    return proto
  flat = array.reshape(-1)
  if field == "half_val":
    values = flat.view(np.uint16).tolist()
  elif field in ("scomplex_val", "dcomplex_val"):
    values = np.stack([flat.real, flat.imag], axis=-1).reshape(-1).tolist()
  elif field == "string_val":
    try:  # Session outputs hold bytes already: no per-element Python loop.
      proto.string_val.extend(flat.tolist())
      return proto
    except TypeError:
      del proto.string_val[:]
    values = [_as_bytes(v) for v in flat]
  else:
    values = flat.tolist()
  getattr(proto, field).extend(values)
  return proto
