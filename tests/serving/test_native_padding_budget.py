"""The native batch budget (--max_elements_per_batch) prices a batch padded by
pad_variable_length_inputs at rows x its widest row, not at the elements its requests carry."""

import concurrent.futures

import numpy as np
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from tests import conftest as root_conftest


class _RowSum(tf.Module):
  """y = the sum of each row of x [N, ?]: a row padded to a wider one sums its padding too."""

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="x")])
  def serve(self, x):
    return {"y": tf.reduce_sum(x, axis=1)}


@pytest.fixture
def native_on():
  root_conftest.require_native()


@pytest.mark.usefixtures("native_on")
def test_a_wide_row_never_shares_a_batch_its_padding_would_take_over_budget(tmp_path):
  """One [1, 10] row and three [1, 1] rows carry 13 elements, under the budget of 15, but padded to
  one batch they are 4 x 10 = 40: each narrow row must go into a batch without the wide one (it
  did share it, so one request of 10 floats made every small one in its batch 10 floats wide)."""
  model = _RowSum()
  tf.saved_model.save(model, str(tmp_path / "m" / "1"), signatures={"serving_default": model.serve})
  server = lib.batching_server(
    tmp_path,
    "max_batch_size { value: 4 } batch_timeout_micros { value: 200000 } num_batch_threads { value: 1 } "
    "pad_variable_length_inputs: true",
    max_elements_per_batch=15,
    native="on",
  )
  try:

    def predict(width: int) -> list[float]:
      request = predict_pb2.PredictRequest()
      request.model_spec.name = "m"
      request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((1, width), np.float32)))
      return list(server.predict.Predict(request, timeout=120).outputs["y"].float_val)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      results = list(pool.map(predict, (10, 1, 1, 1)))
    # Padding repeats a row's first element (TF Serving's rule): a narrow row batched with the wide one
    # would sum to 10.
    assert results == [[10.0], [1.0], [1.0], [1.0]]
  finally:
    server.stop()
