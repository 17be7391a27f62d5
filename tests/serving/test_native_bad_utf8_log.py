"""A Predict whose string fields hold bad UTF-8 writes nothing to the native server's log.

libprotobuf logged one ERROR line per such request as the native path parsed it, a line any client
could write at will; the request itself is answered INVALID_ARGUMENT, as on the Python path.
"""

import grpc
import pytest
import serving_testlib as lib
import tensorflow as tf
from google.protobuf.internal import encoder

from tests import conftest as root_conftest


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field."""
  return encoder._VarintBytes(number << 3 | 2) + encoder._VarintBytes(len(payload)) + payload


def test_bad_utf8_requests_are_invalid_argument_and_leave_no_log_lines(tmp_path, capfd):
  root_conftest.require_native()
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"), native="on")
  try:
    x = _field(1, b"x") + _field(2, tf.make_tensor_proto([1.0]).SerializeToString())
    bodies = (
      _field(1, _field(1, b"m\xff")) + _field(2, x),  # ModelSpec.name
      _field(1, _field(1, b"m") + _field(3, b"serving\xffdefault")) + _field(2, x),  # signature_name
      _field(1, _field(1, b"m")) + _field(2, x) + _field(3, b"y\xff"),  # output_filter
    )
    predict = server.channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    capfd.readouterr()
    for body in bodies:
      with pytest.raises(grpc.RpcError) as info:
        predict(body, timeout=60)
      assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
      assert "bad UTF-8" in info.value.details()
    assert "UTF-8" not in capfd.readouterr().err
  finally:
    server.stop()
