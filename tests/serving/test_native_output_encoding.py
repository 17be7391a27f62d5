"""The native Predict path encodes every output dtype as the Python path does, with and without
--enable_serialization_as_tensor_content (tf.make_tensor_proto's choice of tensor_content)."""

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
  yield started
  for server in started:
    server.stop()


@pytest.mark.parametrize("rows", [1, 3])
def test_every_output_dtype_is_encoded_as_on_the_python_path(servers, rows):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "m"
  request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.arange(rows, dtype=np.float32) + 1.5))
  native, python = (server.predict.Predict(request, timeout=60) for server in servers)
  assert sorted(native.outputs) == sorted(python.outputs) == sorted(dtype.name for dtype in _DTYPES)
  for name in native.outputs:
    assert native.outputs[name] == python.outputs[name], name
