"""Malformed tensors and JSON bodies only ever raise INVALID_ARGUMENT."""

import grpc
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from serving import errors
from serving.servables import tensor_util
from serving.util import json_tensor

_DTYPES = st.sampled_from(sorted(types_pb2.DataType.values()))


@settings(max_examples=300, deadline=None)
@given(
  dtype=_DTYPES,
  dims=st.lists(st.integers(-2, 6), max_size=4),
  content=st.binary(max_size=64),
  floats=st.lists(st.floats(width=32), max_size=10),
  ints=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=10),
  strings=st.lists(st.binary(max_size=8), max_size=10),
  huge=st.booleans(),
)
def test_to_ndarray_never_crashes(dtype, dims, content, floats, ints, strings, huge):
  proto = tensor_pb2.TensorProto(
    dtype=dtype, tensor_content=content, float_val=floats, int_val=ints, string_val=strings
  )
  dims = dims + ([10**12] if huge else [])
  for d in dims:
    proto.tensor_shape.dim.add(size=d)
  try:
    array = tensor_util.to_ndarray(proto, "x")
  except errors.ServingError as e:
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
  else:
    assert list(array.shape) == dims
    # Whatever decodes must encode back.
    tensor_util.to_tensor_proto(array, dtype)


@pytest.mark.parametrize("dims", [[0, 2**62], [2**62, 0], [0, 2**40 + 1], [3, 0, 2**20, 2**21]])
def test_zero_element_shapes_spanning_too_much_are_invalid_argument(dims):
  """Every dimension counts, not only the product: [0, 2**62] holds no elements, but NumPy can't
  shape an array so (INTERNAL before). The rule is native DeclaredShape's: the nonzero dimensions
  may multiply to at most 2**40."""
  proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
  for d in dims:
    proto.tensor_shape.dim.add(size=d)
  with pytest.raises(errors.ServingError) as info:
    tensor_util.to_ndarray(proto, "x")
  assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert info.value.message.startswith("tensor parsing error: x: shape"), info.value.message


@pytest.mark.parametrize("dims", [[0, 2**40], [2**40, 0], [2**20, 0, 2**20]])
def test_zero_element_shapes_within_the_span_decode(dims):
  proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
  for d in dims:
    proto.tensor_shape.dim.add(size=d)
  assert list(tensor_util.to_ndarray(proto, "x").shape) == dims


_JSON = st.recursive(
  st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=5),
  lambda children: (
    st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["x", "b64", "y", "instances", "inputs"]), children, max_size=3)
  ),
  max_leaves=12,
)


def _signature(dtype):
  signature = meta_graph_pb2.SignatureDef()
  signature.inputs["x"].dtype = dtype
  signature.inputs["x"].name = "x:0"
  return signature


@settings(max_examples=300, deadline=None)
@given(
  body=st.dictionaries(st.sampled_from(["instances", "inputs", "other"]), _JSON, max_size=2),
  dtype=st.sampled_from(
    [types_pb2.DT_FLOAT, types_pb2.DT_INT32, types_pb2.DT_STRING, types_pb2.DT_BOOL, types_pb2.DT_INT64]
  ),
)
def test_json_bodies_never_crash(body, dtype):
  try:
    inputs, _ = json_tensor.parse_predict_body(body, _signature(dtype))
  except errors.ServingError as e:
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
  else:
    if "x" in inputs:
      assert inputs["x"].dtype == tf.as_dtype(dtype).as_numpy_dtype or (
        dtype == types_pb2.DT_STRING and inputs["x"].dtype == object
      )
      try:
        json_tensor.predict_response_json({"y": inputs["x"]}, row_format="instances" in body)
      except errors.ServingError as e:
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT


def test_example_features_take_tf_servings_types():
  """true/false are int64 1/0; a number with a fraction is a float; one feature holds one type."""
  model_input = json_tensor.parse_examples_body({"examples": [{"flag": True, "ids": [False, 7], "w": [0.5, 2.0]}]})
  feature = model_input.example_list.examples[0].features.feature
  assert list(feature["flag"].int64_list.value) == [1]
  assert list(feature["ids"].int64_list.value) == [0, 7]
  assert list(feature["w"].float_list.value) == [0.5, 2.0]
  for mixed in ([1, 0.5], ["a", 1], [{"b64": "YQ=="}, 2.0]):
    with pytest.raises(errors.ServingError, match="Unexpected element type in feature: f"):
      json_tensor.parse_examples_body({"examples": [{"f": mixed}]})
  with pytest.raises(errors.ServingError, match="unexpected JSON type"):
    json_tensor.parse_examples_body({"examples": [{"f": [None]}]})


def test_float32_outputs_print_shortest():
  assert json_tensor.ndarray_to_json(np.array([2.1, 0.1], np.float32), "y") == [2.1, 0.1]


_EXACT_DTYPES = [
  np.float32,
  np.float64,
  np.int8,
  np.int16,
  np.int32,
  np.int64,
  np.uint8,
  np.uint16,
  np.uint32,
  np.uint64,
  np.bool_,
  np.float16,
  np.complex64,
]


@settings(max_examples=300, deadline=None)
@given(
  data=st.data(),
  shape=st.lists(st.integers(0, 4), max_size=3),
  dtype=st.sampled_from(_EXACT_DTYPES + [object]),
  typed_fields=st.booleans(),
)
def test_decoding_matches_make_ndarray(data, shape, dtype, typed_fields):
  """The fast decoding path agrees with tf.make_ndarray on valid tensors."""
  if dtype is object:
    flat = data.draw(st.lists(st.binary(max_size=6), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    array = array.reshape(shape)
  else:
    array = data.draw(hnp.arrays(dtype, shape))
  dtype_enum = tf.as_dtype(array.dtype if dtype is not object else tf.string).as_datatype_enum
  proto = (
    tensor_util.to_tensor_proto(array, dtype_enum)
    if typed_fields
    else tf.make_tensor_proto(array, dtype=tf.as_dtype(dtype_enum))
  )
  decoded = tensor_util.to_ndarray(proto, "x")
  expected = tf.make_ndarray(proto)
  assert decoded.dtype == expected.dtype
  assert decoded.shape == expected.shape
  np.testing.assert_array_equal(decoded, expected)


def _proto(dtype, dims, **fields) -> tensor_pb2.TensorProto:
  proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum, **fields)
  for d in dims:
    proto.tensor_shape.dim.add(size=d)
  return proto


@pytest.mark.parametrize(
  "proto",
  [
    _proto(tf.float32, [2], float_val=[1.5, 2.5, 3.5]),  # More values than the shape: the first ones.
    _proto(tf.float32, [4], float_val=[1.5, 2.5]),  # Fewer: the last one repeats.
    _proto(tf.int8, [1], int_val=[3, 4]),
    _proto(tf.float16, [1], half_val=[15360, 16384]),
    _proto(tf.complex64, [1], scomplex_val=[1, 2, 3, 4]),
    _proto(tf.string, [1, 2], string_val=[b"x", b"y", b"z"]),
    _proto(tf.string, [2], tensor_content=b"\x01\x02abc"),  # TF's string-list form.
    _proto(tf.string, [1], tensor_content=b"\x81\x01" + b"a" * 129),  # A two-byte varint length.
    _proto(tf.string, [1], tensor_content=b"\x01a", string_val=[b"other"]),  # tensor_content wins.
    _proto(tf.float32, [1], tensor_content=np.float32([1.0]).tobytes(), float_val=[7.0]),
  ],
  ids=lambda p: str(p).replace("\n", " ")[:60],
)
def test_requests_decode_as_tensorflow_decodes_them(proto):
  """TF Serving decodes inputs with TF's Tensor::FromProto; tf.io.parse_tensor runs that very code."""
  expected = tf.io.parse_tensor(proto.SerializeToString(), tf.as_dtype(proto.dtype)).numpy()
  decoded = tensor_util.to_ndarray(proto, "x")
  assert decoded.dtype == expected.dtype
  assert decoded.shape == expected.shape
  np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("content", [b"\x01\x02ab", b"\x01\x02abcd", b"\x80", b"\xff\xff\xff\xff\xff\x01a"])
def test_string_tensor_content_that_tensorflow_refuses_is_invalid_argument(content):
  with pytest.raises(errors.ServingError) as info:
    tensor_util.to_ndarray(_proto(tf.string, [2], tensor_content=content), "x")
  assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert info.value.message.startswith("tensor parsing error: x: tensor_content of"), info.value.message


_ALL_DTYPES = (
  tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8,
  tf.uint16, tf.uint32, tf.uint64, tf.bool, tf.complex64, tf.complex128, tf.string,
)  # fmt: skip


@pytest.mark.parametrize("dtype", _ALL_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("size", [0, 1, 3])
def test_outputs_as_tensor_content_are_what_tensorflow_writes(dtype, size):
  """--enable_serialization_as_tensor_content: TF Serving's Tensor::AsProtoTensorContent puts every
  dtype and size in tensor_content, strings too, in the form TF decodes."""
  values = tf.range(size, dtype=tf.float32) * 300 + 1.5
  array = (tf.strings.as_string(values) if dtype == tf.string else tf.cast(values, dtype)).numpy()
  proto = tensor_util.to_tensor_proto(array, dtype.as_datatype_enum, as_tensor_content=True)
  assert [field.name for field, _ in proto.ListFields() if field.name.endswith("_val")] == []
  assert len(proto.tensor_content) > 0 or size == 0
  np.testing.assert_array_equal(tf.io.parse_tensor(proto.SerializeToString(), dtype).numpy(), array)
  np.testing.assert_array_equal(tensor_util.to_ndarray(proto, "y"), array)
