"""The C++ echo PredictionService of the benchmarks answers like the Python one (bench/echo_server.py)."""

import grpc
import native_testlib
import pytest
from tensorflow_serving.apis import classification_pb2, predict_pb2, prediction_service_pb2_grpc

from bench import echo_server
from bench.fixtures import servers


@pytest.fixture(scope="module")
def native_echo(tmp_path_factory):
  if servers.native_echo_binary() is None:
    native_testlib.skip_or_fail_unavailable("build/native/echo_server is not built: run `make install`")
  with servers.native_echo_server(str(tmp_path_factory.mktemp("native_echo")), k=10) as process:
    yield process
  assert process.process.returncode == 0  # SIGTERM stops it cleanly.


def test_predict_answers_the_python_echo_response(native_echo):
  with grpc.insecure_channel(native_echo.address) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "anything"
    for _ in range(3):
      assert stub.Predict(request, timeout=10) == echo_server.fixed_response(10)


def test_other_methods_and_bad_requests_are_refused(native_echo):
  with grpc.insecure_channel(native_echo.address) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as error:
      stub.Classify(classification_pb2.ClassificationRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    with pytest.raises(grpc.RpcError) as error:
      predict(b"\xff\xff\xff", timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
