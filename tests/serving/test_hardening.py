"""Edge validation, request limits and security of fgr-serve (issue 7)."""

import asyncio
import concurrent.futures
import gc
import json
import os
import pathlib
import re
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import (
  classification_pb2,
  get_model_metadata_pb2,
  get_model_status_pb2,
  predict_pb2,
  prediction_service_pb2_grpc,
)

from bench import tf_timeout_leak
from serving import errors
from serving.model_servers import server as server_lib
from serving.model_servers import service_impl
from serving.servables import input_util
from serving.util import allocator

SERVING_DIR = os.path.join(lib.REPO_ROOT, "serving")


def _request(model=lib.TF2_MODEL, x=(1.0, 2.0), signature=""):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model
  request.model_spec.signature_name = signature
  request.inputs["x"].CopyFrom(tf.make_tensor_proto(list(x), dtype=tf.float32))
  return request


# --- Validation at the edge ------------------------------------------------


def test_nan_inf_pass_through_and_empty_strings(server):
  """As TF Serving: NaN/Inf reach the graph; empty and long strings are data."""
  response = server.predict.Predict(_request(x=(float("nan"), float("inf"), -float("inf"))), timeout=30)
  y = tf.make_ndarray(response.outputs["y"])
  assert np.isnan(y[0]) and y[1] == np.inf and y[2] == -np.inf
  echo = predict_pb2.PredictRequest()
  echo.model_spec.name = lib.TF2_MODEL
  echo.model_spec.signature_name = "echo"
  big = b"\xff" * (1 << 20)
  echo.inputs["text"].CopyFrom(tf.make_tensor_proto([b"", big]))
  response = server.predict.Predict(echo, timeout=30)
  assert tf.make_ndarray(response.outputs["length"]).tolist() == [0, 1 << 20]


@pytest.mark.parametrize(
  "method",
  [
    "PredictionService/Predict",
    "PredictionService/Classify",
    "PredictionService/GetModelMetadata",
    "ModelService/GetModelStatus",
  ],
)
def test_unparsable_protos_are_invalid_argument(server, method):
  call = server.channel.unary_unary(
    f"/tensorflow.serving.{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
  )
  code, details = lib.grpc_code(call, b"\x0a\xff\xff\xff\xff\x0f")
  assert code == grpc.StatusCode.INVALID_ARGUMENT
  assert details.startswith("Malformed ")


def test_unknown_model_version_signature_on_every_rpc(server):
  predict = _request(model="nope")
  assert lib.grpc_code(server.predict.Predict, predict)[0] == grpc.StatusCode.NOT_FOUND
  classify = classification_pb2.ClassificationRequest()
  classify.model_spec.name = lib.TF1_MODEL
  classify.model_spec.version.value = 7
  classify.input.example_list.examples.add()
  code, details = lib.grpc_code(server.predict.Classify, classify)
  assert code == grpc.StatusCode.NOT_FOUND and "7" in details
  signature = _request(signature="nope")
  code, details = lib.grpc_code(server.predict.Predict, signature)
  assert code == grpc.StatusCode.FAILED_PRECONDITION and "nope" in details
  metadata = get_model_metadata_pb2.GetModelMetadataRequest()
  metadata.model_spec.name = "nope"
  metadata.metadata_field.append("signature_def")
  assert lib.grpc_code(server.predict.GetModelMetadata, metadata)[0] == grpc.StatusCode.NOT_FOUND
  status = get_model_status_pb2.GetModelStatusRequest()
  status.model_spec.name = lib.TF2_MODEL
  status.model_spec.version.value = 99
  assert lib.grpc_code(server.model.GetModelStatus, status)[0] == grpc.StatusCode.NOT_FOUND
  code, body = lib.post_json(server.rest_port, "/v1/models/nope:predict", b'{"instances": [1.0]}')
  assert code == 404 and "nope" in body["error"]
  code, body = lib.post_json(server.rest_port, f"/v1/models/{lib.TF2_MODEL}:predict", b"{not json")
  assert code == 400 and "JSON Parse error" in body["error"]


# --- Limits ----------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory, native_mode):
  """An in-process server with every request limit set low, and batching
  whose batches wait an hour unless full: a one-row request's deadline
  always expires in the queue, however slow the machine."""
  tmp = tmp_path_factory.mktemp("limited")
  lib.write_tf2_half_plus_two(str(tmp / "m" / "1"))
  server = lib.batching_server(
    tmp,
    "max_batch_size { value: 64 } batch_timeout_micros { value: 3600000000 }",
    rest_api_port=lib.REST_ANY_PORT,
    max_batch_size_per_request=4,
    max_in_flight_requests=2,
    grpc_max_receive_message_length=4096,
    rest_api_max_body_bytes=4096,
    rest_api_timeout_in_ms=1500,
    grpc_max_threads=8,
    native=native_mode,
  )
  yield server
  server.stop()


def test_batch_over_the_maximum_is_invalid_argument(limited):
  rows = _request(model="m", x=[1.0] * 5)
  code, details = lib.grpc_code(limited.predict.Predict, rows)
  assert code == grpc.StatusCode.INVALID_ARGUMENT
  assert "batch size 5 exceeds the maximum of 4" in details
  classify = classification_pb2.ClassificationRequest()
  classify.model_spec.name = "m"
  for _ in range(5):
    classify.input.example_list.examples.add()
  code, details = lib.grpc_code(limited.predict.Classify, classify)
  assert code == grpc.StatusCode.INVALID_ARGUMENT and "batch size 5" in details


def test_request_size_limits(limited):
  big = _request(model="m", x=[1.0] * 2000)  # ~8 kB > 4096 bytes.
  code, _ = lib.grpc_code(limited.predict.Predict, big)
  assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
  body = json.dumps({"instances": [1.0] * 2000}).encode()
  code, payload = lib.post_json(limited.server.rest_port, "/v1/models/m:predict", body)
  assert code == 413 and "--rest_api_max_body_bytes" in payload["error"]


def test_slow_rest_client_loses_its_connection(limited):
  """A client that stops sending mid-body can't hold a REST thread."""
  with socket.create_connection(
    ("127.0.0.1", limited.server.rest_port), timeout=120
  ) as sock:  # Generous: only a hang fails.
    sock.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    # Closed by the server (after --rest_api_timeout_in_ms, 1.5 s here).
    assert sock.recv(1024) == b""


def test_deadline_expires_in_the_batch_queue(limited):
  """A request whose deadline passes while its batch waits gets
  DEADLINE_EXCEEDED from the server, not only from the client. The batch
  waits an hour, so the deadlines (0.3 s) always expire first."""
  with pytest.raises(errors.ServingError) as info:
    limited.server.api.predict(_request(model="m", x=[1.0]), timeout_ms=300)
  assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
  assert "waiting for a batch" in info.value.message
  code, _ = lib.grpc_code(limited.predict.Predict, _request(model="m", x=[1.0]), timeout=0.3)
  assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_rest_call_past_its_timeout_answers_504_when_its_run_ends(tmp_path, monkeypatch):
  """Runs get no RunOptions timeout (TF 2.20 leaks on that path), so a REST run outlasting
  --rest_api_timeout_in_ms finishes; its answer is still TF Serving's DEADLINE_EXCEEDED."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"))
  real_run = service_impl.predict_util.run_predict

  def slow_run(*args, **kwargs):
    time.sleep(0.2)
    return real_run(*args, **kwargs)

  monkeypatch.setattr(service_impl.predict_util, "run_predict", slow_run)
  try:
    with pytest.raises(errors.ServingError) as info:
      server.server.api.predict(_request(model="m"), timeout_ms=50, entrypoint="REST")
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and info.value.http_status == 504
    # Within its timeout, the same slow run answers.
    assert server.server.api.predict(_request(model="m"), timeout_ms=60_000, entrypoint="REST").outputs["y"].float_val
  finally:
    server.stop()


def test_a_call_cancelled_before_a_worker_takes_it_never_runs():
  """The Python path's unbatched runs wait for a worker thread: one whose RPC ends first (deadline,
  cancellation) is not run. One already running is waited for, so its servable outlives the run."""
  started, release = threading.Event(), threading.Event()
  ran = []

  def blocking() -> str:
    started.set()
    release.wait(60)
    ran.append("blocking")
    return "blocking"

  async def main() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
      running = asyncio.ensure_future(service_impl._run_in(executor, blocking))  # pylint: disable=protected-access
      await asyncio.get_running_loop().run_in_executor(None, started.wait, 60)
      queued = asyncio.ensure_future(service_impl._run_in(executor, ran.append, "queued"))  # pylint: disable=protected-access
      await asyncio.sleep(0)
      queued.cancel()
      running.cancel()
      with pytest.raises(asyncio.CancelledError):
        await queued
      release.set()
      with pytest.raises(asyncio.CancelledError):
        await running  # Raised once the run is over.
      assert ran == ["blocking"]

  asyncio.run(main())
  assert ran == ["blocking"]


def _request_counts(server, model: str) -> dict[str, float]:
  """request_count by status for `model` (a model_name label value)."""
  text = server.server.metrics.exposition().decode()
  pattern = rf':tensorflow:serving:request_count_total\{{model_name="{re.escape(model)}",status="(\w+)"\}} (\S+)'
  return {status: float(count) for status, count in re.findall(pattern, text)}


def test_in_flight_limit_is_resource_exhausted(limited, monkeypatch):
  """With 2 requests held inside the server, a third one is refused at once.

  The two are Classify calls held on an event the test sets, so they stay in
  flight for as long as the test needs, whatever the machine's speed.
  """
  entered, release = threading.Semaphore(0), threading.Event()

  def held_classify(*unused_args, **unused_kwargs):
    entered.release()
    release.wait()
    return classification_pb2.ClassificationResponse()

  monkeypatch.setattr(input_util.ExamplesApi, "run", held_classify)  # Classify and Regress run through it.
  classify = classification_pb2.ClassificationRequest()
  classify.model_spec.name = "m"
  classify.input.example_list.examples.add()
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    held = [pool.submit(lib.grpc_code, limited.predict.Classify, classify, 120) for _ in range(2)]
    try:
      for _ in held:
        assert entered.acquire(timeout=60)
      code, details = lib.grpc_code(limited.predict.Predict, _request(model="m", x=[1.0]))
      assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
      assert "--max_in_flight_requests" in details
      # Refused before their model is looked up, calls naming made-up models count under
      # model_name="": a client making up names must not add label values (series kept for good).
      before = _request_counts(limited, "")
      for i in range(5):
        code, details = lib.grpc_code(limited.predict.Predict, _request(model=f"made_up_{i}", x=[1.0]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
      exposition = limited.server.metrics.exposition().decode()
      assert "made_up_" not in exposition
      assert _request_counts(limited, "").get("RESOURCE_EXHAUSTED", 0) == before.get("RESOURCE_EXHAUSTED", 0) + 5
      status, payload = lib.post_json(limited.server.rest_port, "/v1/models/m:predict", b'{"instances": [1.0]}')
      assert status == 429 and "in flight" in payload["error"]
    finally:
      release.set()
    for future in held:
      assert future.result()[0] == grpc.StatusCode.OK


# --- Memory ----------------------------------------------------------------


@pytest.mark.usefixtures("native")
@pytest.mark.skipif(allocator.mimalloc_active(), reason="measures glibc's malloc")
def test_runs_failing_in_the_graph_with_a_deadline_leave_nothing(tmp_path):
  """Requests failing inside the graph (inputs of different lengths), sent with a deadline, are
  INVALID_ARGUMENT and leave no memory behind. The deadline used to reach TF as
  RunOptions.timeout_in_ms, whose path leaks about 714 bytes a failing run in TF 2.20
  (bench/tf_timeout_leak.py). The margin, 150 bytes a request, is a fifth of that."""
  module = tf_timeout_leak.AddModule()
  tf.saved_model.save(module, str(tmp_path / "add" / "1"), signatures={"serving_default": module.add})
  server = lib.InProcessServer(model_name="add", model_base_path=str(tmp_path / "add"))
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "add"
  request.inputs["a"].CopyFrom(tf.make_tensor_proto([1.0, 2.0], dtype=tf.float32))
  request.inputs["b"].CopyFrom(tf.make_tensor_proto([1.0, 2.0, 3.0], dtype=tf.float32))

  def fail(count: int) -> None:
    for _ in range(count):
      code, details = lib.grpc_code(server.predict.Predict, request, timeout=60)
      assert code == grpc.StatusCode.INVALID_ARGUMENT and "Incompatible shapes" in details, details

  try:
    fail(500)  # One-off costs: kernels, gRPC's buffers, TF's rate-limited logging.
    gc.collect()
    before = tf_timeout_leak.malloc_in_use_bytes()
    count = 5000
    fail(count)
    gc.collect()
    growth = tf_timeout_leak.malloc_in_use_bytes() - before
  finally:
    server.stop()
  figures = f"malloc in use grew {growth / count:.0f} bytes a request"
  print(figures)
  assert growth <= 150 * count, figures


# --- Security --------------------------------------------------------------


def _listening_addresses(port: int):
  addresses = []
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as f:
      for line in f.readlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.rsplit(":", 1)
        if state == "0A" and int(hex_port, 16) == port:  # LISTEN
          addresses.append(address)
  return addresses


def test_binds_loopback_by_default(server):
  assert server_lib.Options().host == "127.0.0.1"
  loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # (::ffff:)
  for port in (server.grpc_port, server.rest_port):
    addresses = _listening_addresses(port)
    assert addresses and set(addresses) <= loopback, addresses


@pytest.mark.usefixtures("native")
def test_tls(tmp_path):
  key, cert = (pathlib.Path(path).read_text() for path in lib.self_signed_cert(str(tmp_path)))
  ssl_config = tmp_path / "ssl.config"
  ssl_config.write_text(f"server_key: {json.dumps(key)}\nserver_cert: {json.dumps(cert)}\n")
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"), ssl_config_file=str(ssl_config))
  try:
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.encode())
    with grpc.secure_channel(f"localhost:{server.server.grpc_port}", credentials) as channel:
      stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
      response = stub.Predict(_request(model="m"), timeout=30)
      assert tf.make_ndarray(response.outputs["y"]).tolist() == [2.5, 3.0]
    code, _ = lib.grpc_code(server.predict.Predict, _request(model="m"), timeout=5)
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)  # Plaintext refused.
  finally:
    server.stop()
  ssl_config.write_text(f"server_cert: {json.dumps(cert)}\nclient_verify: true\n")
  with pytest.raises(errors.ServingError, match="server_key and server_cert"):
    server_lib.Server(
      server_lib.Options(
        model_name="m", model_base_path=str(tmp_path / "m"), port=0, ssl_config_file=str(ssl_config), native=lib.NATIVE
      )
    ).start()


@pytest.mark.usefixtures("native")
def test_model_paths_cannot_escape_roots(tmp_path):
  root, outside = tmp_path / "root", tmp_path / "outside"
  lib.write_tf2_half_plus_two(str(outside / "m" / "1"))
  os.makedirs(root / "m")
  os.symlink(outside / "m", root / "link")
  for base in (outside / "m", root / ".." / "outside" / "m", root / "link"):
    with pytest.raises(errors.ServingError, match="outside the allowed roots"):
      server_lib.Server(
        server_lib.Options(
          model_name="m", model_base_path=str(base), port=0, model_base_path_roots=[str(root)], native=lib.NATIVE
        )
      ).start()
  # A version directory symlinked out of the root fails to load.
  lib.write_tf2_half_plus_two(str(root / "m" / "1"))
  server = lib.InProcessServer(
    model_name="m",
    model_base_path=str(root / "m"),
    model_base_path_roots=[str(root)],
    file_system_poll_wait_seconds=0.2,
  )
  try:
    os.symlink(outside / "m" / "1", root / "m" / "2")
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "m"

    def version_2_error():
      response = server.model.GetModelStatus(status, timeout=30)
      return {v.version: v.status.error_message for v in response.model_version_status}.get(2)

    assert "outside the allowed roots" in lib.wait_for(version_2_error)
    response = server.predict.Predict(_request(model="m"), timeout=30)
    assert response.model_spec.version.value == 1
  finally:
    server.stop()


def test_nothing_from_a_request_is_unpickled_or_evaluated():
  """Audit: serving/ has no pickle, eval/exec, marshal or unsafe loaders."""
  banned = re.compile(
    r"\b(pickle|cPickle|marshal|shelve|dill)\b|"
    r"(?<![\w.])(eval|exec|compile)\(|yaml\.load\(|"
    r"allow_pickle\s*=\s*True|__import__\("
  )
  hits = []
  for directory, _, files in os.walk(SERVING_DIR):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8") as f:
          for number, line in enumerate(f, 1):
            if banned.search(line.split("#")[0]):
              hits.append(f"{path}:{number}: {line.strip()}")
  assert not hits, hits
