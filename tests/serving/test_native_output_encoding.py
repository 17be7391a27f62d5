"""The native Predict path encodes every output dtype as the Python path does, with and without
--enable_serialization_as_tensor_content (then, as TF Serving's Tensor::AsProtoTensorContent,
every output in tensor_content), and decodes string inputs sent in tensor_content as TF does."""

import numpy as np
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from tests import conftest as root_conftest

_DTYPES = (
  tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8,
  tf.uint16, tf.uint32, tf.uint64, tf.bool, tf.complex64, tf.complex128, tf.string,
)  # fmt: skip


class _EveryDtype(tf.Module):
  """x [N] float32 -> x cast to each dtype the native path encodes."""

  @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
  def serve(self, x):
    return {dtype.name: tf.strings.as_string(x) if dtype == tf.string else tf.cast(x, dtype) for dtype in _DTYPES}


@pytest.fixture(scope="module", params=[False, True], ids=["typed_fields", "tensor_content"])
def servers(request, tmp_path_factory):
  root_conftest.require_native()
  base = tmp_path_factory.mktemp("models") / "m"
  model = _EveryDtype()
  tf.saved_model.save(model, str(base / "1"), signatures={"serving_default": model.serve})
  started = [
    lib.InProcessServer(
      model_name="m", model_base_path=str(base), native=mode, enable_serialization_as_tensor_content=request.param
    )
    for mode in ("on", "off")
  ]
  yield request.param, started
  for server in started:
    server.stop()


@pytest.mark.parametrize("rows", [1, 3])
def test_every_output_dtype_is_encoded_as_on_the_python_path(servers, rows):
  as_tensor_content, started = servers
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "m"
  request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.arange(rows, dtype=np.float32) + 1.5))
  native, python = (server.predict.Predict(request, timeout=60) for server in started)
  assert sorted(native.outputs) == sorted(python.outputs) == sorted(dtype.name for dtype in _DTYPES)
  for name in native.outputs:
    assert native.outputs[name] == python.outputs[name], name
    output = native.outputs[name]
    assert bool(output.tensor_content) == as_tensor_content, name
    expected = np.arange(rows, dtype=np.float32) + 1.5
    expected = tf.strings.as_string(expected) if name == "string" else tf.cast(expected, tf.as_dtype(name))
    decoded = tf.io.parse_tensor(output.SerializeToString(), tf.as_dtype(output.dtype))
    np.testing.assert_array_equal(decoded.numpy(), expected.numpy())


class _Echo(tf.Module):
  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="s")])
  def serve(self, s):
    return {"s": tf.identity(s)}


@pytest.mark.parametrize("native", ["on", "off"])
def test_string_inputs_in_tensor_content_decode_as_tensorflow_decodes_them(tmp_path, native):
  """TF reads a string tensor's tensor_content (varint lengths, then the bytes) before string_val."""
  if native == "on":
    root_conftest.require_native()
  model = _Echo()
  tf.saved_model.save(model, str(tmp_path / "m" / "1"), signatures={"serving_default": model.serve})
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"), native=native)
  try:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["s"].dtype = tf.string.as_datatype_enum
    request.inputs["s"].tensor_shape.dim.add(size=2)
    request.inputs["s"].tensor_content = b"\x01\x02abc"
    request.inputs["s"].string_val.extend([b"not", b"read"])
    assert list(server.predict.Predict(request, timeout=60).outputs["s"].string_val) == [b"a", b"bc"]
  finally:
    server.stop()
