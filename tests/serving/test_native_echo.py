"""The C++ echo PredictionService of the benchmarks answers like the Python one (bench/echo_server.py)."""

import grpc
import native_testlib
import numpy as np
import pytest
from tensorflow_serving.apis import classification_pb2, predict_pb2, prediction_service_pb2_grpc

from bench import echo_server
from bench.fixtures import load_client, servers


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


def _load_client(native_echo, tmp_path, load: str) -> tuple[dict, np.ndarray]:
  if load_client.binary() is None:
    native_testlib.skip_or_fail_unavailable("build/native/fgr_load_client is not built: run `make install`")
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "anything"
  requests = str(tmp_path / "requests.bin")
  load_client.write_requests([request], requests)
  summary = load_client.drive(
    native_echo.address, requests, load, str(tmp_path), seconds=2, warmup_seconds=0.5, timeout=60
  )
  return summary, summary["latencies"]


def test_load_client_open_loop_sends_on_schedule_and_reports_its_lag(native_echo, tmp_path):
  """The benchmarks' load client at 100 requests/s for 2 s: about 200 answered, every latency
  written, and its own send lag reported beside them."""
  summary, latencies = _load_client(native_echo, tmp_path, "--qps=100")
  assert summary["errors"] == 0
  assert 100 <= summary["ok"] <= 201  # Calls still in flight when the window closes are not counted.
  assert len(latencies) == summary["ok"] and (latencies > 0).all()
  assert 0 <= summary["send_lag_p50_us"] <= summary["send_lag_p99_us"]


def test_load_client_closed_loop_keeps_its_streams_busy(native_echo, tmp_path):
  summary, latencies = _load_client(native_echo, tmp_path, "--streams=2")
  assert summary["errors"] == 0 and summary["ok"] > 0
  assert len(latencies) == summary["ok"]
  assert "send_lag_p50_us" not in summary  # Closed loop sends as answers come: there is no schedule.
