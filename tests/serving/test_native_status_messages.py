"""Error messages the native Predict path sends are valid UTF-8, worded as the Python path's.

TF's errors echo what the client sent (a tf.Example ParseExample could not parse, say); gRPC sends a
status message as UTF-8, so bytes that are not are written as Python's "backslashreplace" writes them.
"""

import grpc
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from tests import conftest as root_conftest

# Valid UTF-8 among ill-formed sequences: a bad continuation, a truncated then a whole euro sign,
# a truncated 4-byte sequence, a surrogate, an overlong "/", a byte never in UTF-8, and valid text.
_VALUES = (
  b"\xc7\xff\\ok",
  b"\xe2\x82\xe2\x82\xac",
  b"\xf0\x90A",
  b"\xed\xa0\x80",
  b"\xc0\xaf",
  b"\xfe",
  "é€😀".encode(),
)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
  root_conftest.require_native()
  base = tmp_path_factory.mktemp("models") / lib.TF1_MODEL
  lib.write_tf1_half_plus_two(str(base / "1"))
  started = [
    lib.InProcessServer(model_name=lib.TF1_MODEL, model_base_path=str(base), native=mode) for mode in ("on", "off")
  ]
  yield started
  for server in started:
    server.stop()


@pytest.mark.parametrize("value", _VALUES)
def test_a_run_error_echoing_request_bytes_reads_the_same_on_both_paths(servers, value):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = lib.TF1_MODEL
  request.model_spec.signature_name = "classify_x_to_y"  # ParseExample echoes the unparsable input.
  request.inputs["inputs"].CopyFrom(tf.make_tensor_proto([value]))
  native, python = (lib.grpc_code(server.predict.Predict, request) for server in servers)
  assert native[0] == python[0] == grpc.StatusCode.INVALID_ARGUMENT
  assert value.decode("utf-8", "backslashreplace") in native[1]
  assert native == python
