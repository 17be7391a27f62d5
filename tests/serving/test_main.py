"""The fgr-serve process: flags, port reporting and graceful SIGTERM."""

import concurrent.futures
import ctypes
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest
import serving_testlib as lib
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import predict_pb2

from serving import errors
from serving.model_servers import grpc_server
from serving.model_servers import server as server_lib

# main.py defines absl flags such as --port at import; other test modules may
# define the same names in this process, so flag checks run in a subprocess.
_FLAG_CHECKS = """
import dataclasses
from absl import app
from serving.model_servers import main, server
main.FLAGS(["fgr-serve", "--prefer_tflite_model"])
try:
  main.server_flags.check_unsupported_flags()
except app.UsageError as e:
  print("USAGE_ERROR", e)
print("CHANNEL_ARGS", main._channel_arguments(
    "grpc.max_connection_age_ms=2000,a=b"))
try:
  main._channel_arguments("novalue")
except app.UsageError:
  print("BAD_CHANNEL_ARGS_REJECTED")
fields = {f.name for f in dataclasses.fields(server.Options)}
print("OPTIONS_WITHOUT_FLAG", sorted(fields - set(main.FLAGS)))
main.FLAGS(["fgr-serve", "--model_base_path_roots=/a,/b",
            "--max_in_flight_requests=3", "--max_batch_size_per_request=8",
            "--grpc_max_receive_message_length=-1",
            "--ssl_config_file=/s"])
options = main.options_from_flags()
print("HARDENING", options.model_base_path_roots,
      options.max_in_flight_requests, options.max_batch_size_per_request,
      options.grpc_max_receive_message_length,
      options.rest_api_max_body_bytes, options.ssl_config_file)
"""


def test_grpc_channel_arguments_replace_the_servers_own():
  """The Python path's grpc.aio server takes --grpc_channel_arguments over its own (one value a key)."""
  ours = dict(grpc_server.server_options(1 << 20, []))
  assert ours["grpc.server.max_pending_requests"] == grpc_server.MAX_PENDING_CALLS
  assert ours["grpc.server.max_pending_requests_hard_limit"] == grpc_server.MAX_PENDING_CALLS
  assert ours["grpc.max_receive_message_length"] == 1 << 20
  user = [("grpc.server.max_pending_requests", 10), ("grpc.max_connection_age_ms", 2000)]
  options = grpc_server.server_options(1 << 20, user)
  keys = [key for key, _ in options]
  assert len(keys) == len(set(keys)), keys
  assert dict(options) == {**ours, **dict(user)}


def test_flags():
  """Unsupported TF Serving flags fail clearly; options mirror flags."""
  result = subprocess.run(
    [sys.executable, "-c", _FLAG_CHECKS],
    cwd=lib.REPO_ROOT,
    env=dict(os.environ, PYTHONPATH=lib.REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3"),
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  out = result.stdout
  assert ("USAGE_ERROR --prefer_tflite_model is a TensorFlow Serving flag that fgr-serve does not support") in out
  assert "CHANNEL_ARGS [('grpc.max_connection_age_ms', 2000), ('a', 'b')]" in out
  assert "BAD_CHANNEL_ARGS_REJECTED" in out
  assert "OPTIONS_WITHOUT_FLAG ['session_config']" in out
  assert f"HARDENING ['/a', '/b'] 3 8 -1 {64 << 20} /s" in out


@pytest.mark.usefixtures("native")
def test_sigterm_drains_in_flight_requests(tmp_path):
  """A request waiting in a batch when SIGTERM arrives still succeeds."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  params = tmp_path / "batching.config"
  params.write_text("max_batch_size { value: 64 } batch_timeout_micros { value: 3000000 }")
  proc = lib.ServerProcess(
    [
      "--model_name=m",
      f"--model_base_path={tmp_path / 'm'}",
      "--enable_batching",
      f"--batching_parameters_file={params}",
      "--max_in_flight_requests=1",
    ],  # Shows when the request is in flight.
    str(tmp_path),
  )
  with open(proc.stdout_path) as f:
    assert f"FGR_SERVE_GRPC_PORT={proc.grpc_port}" in f.read()
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "m"
  request.inputs["x"].CopyFrom(tf.make_tensor_proto([2.0], dtype=tf.float32))
  probe = predict_pb2.PredictRequest()
  probe.model_spec.name = "nope"  # Takes the one in-flight slot, if free.

  def request_in_flight():
    try:
      proc.predict.Predict(probe, timeout=60)
    except grpc.RpcError as e:
      return e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # Else NOT_FOUND.
    raise AssertionError("a Predict on a missing model succeeded")

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    in_flight = pool.submit(proc.predict.Predict, request, timeout=120)
    # Its batch waits 3 s; once the request holds the slot, it is in flight.
    lib.wait_for(request_in_flight, timeout=60)
    proc.process.send_signal(15)
    response = in_flight.result(timeout=120)
  assert response.outputs["y"].float_val == [3.0]
  code = proc.terminate()
  assert code == 0, proc.stderr()[-3000:]


@pytest.mark.usefixtures("native")
def test_sigterm_landing_on_any_thread_stops_the_server(tmp_path):
  """The kernel hands a process's SIGTERM to a thread of its choosing, not
  always the main one; the server must stop all the same. tgkill aims it at
  another thread, as the kernel sometimes does (1 start in 30 hung on it)."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  proc = lib.ServerProcess(["--model_name=m", f"--model_base_path={tmp_path / 'm'}"], str(tmp_path))
  pid = proc.process.pid
  other = next(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
  libc = ctypes.CDLL(None, use_errno=True)
  assert libc.tgkill(pid, other, signal.SIGTERM) == 0, os.strerror(ctypes.get_errno())
  try:
    code = proc.process.wait(timeout=60)  # Exits in well under a second; it used to sleep an hour.
  finally:
    proc.terminate()
  assert code == 0, proc.stderr()[-3000:]
  assert "Received signal 15: shutting down gracefully" in proc.stderr()


def _threads_opening_a_fifo(pid: int) -> int:
  """How many of the process's threads wait in open() on a FIFO with no writer."""
  count = 0
  for tid in os.listdir(f"/proc/{pid}/task"):
    try:
      with open(f"/proc/{pid}/task/{tid}/wchan") as f:
        count += f.read() == "wait_for_partner"
    except OSError:  # The thread ended.
      pass
  return count


def _write_stuck_version(version_dir: pathlib.Path) -> None:
  """A version whose load never returns, as on a hung file system: its variables are a FIFO that
  nobody writes, so the load blocks opening them. Staged, then renamed in whole."""
  staged = version_dir.parent / f".staged-{version_dir.name}"
  lib.write_tf2_half_plus_two(str(staged))
  (data,) = (staged / "variables").glob("variables.data-*")
  data.unlink()
  os.mkfifo(data)
  staged.rename(version_dir)


@pytest.mark.usefixtures("native")
def test_sigterm_does_not_wait_for_a_load_that_cannot_finish(tmp_path):
  """A new version whose load never returns must not hold the stop: the served version drains and
  the process exits 0, where Python's exit used to join the load thread forever."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  proc = lib.ServerProcess(
    ["--model_name=m", f"--model_base_path={tmp_path / 'm'}", "--file_system_poll_wait_seconds=1"], str(tmp_path)
  )
  _write_stuck_version(tmp_path / "m" / "2")
  try:
    lib.wait_for(lambda: _threads_opening_a_fifo(proc.process.pid) >= 1, timeout=120)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([2.0], dtype=tf.float32))
    assert proc.predict.Predict(request, timeout=60).outputs["y"].float_val == [3.0]  # Version 1 serves on.
  finally:
    code = proc.terminate(timeout=120)  # Aborts it if the stop hangs, with its threads' stacks in the log.
  assert code == 0, proc.stderr()[-3000:]
  assert "not waiting for the loads still running (model: m, version: 2)" in proc.stderr()


@pytest.mark.usefixtures("native")
def test_a_failed_start_does_not_wait_for_another_models_load(tmp_path):
  """One model failing to load fails the start-up (exit 1) at once, even while another model's load
  never returns. Loads run one at a time in config order: the broken model fails first."""
  lib.write_broken(str(tmp_path / "bad" / "1"))
  (tmp_path / "stuck").mkdir()
  _write_stuck_version(tmp_path / "stuck" / "1")
  config = tmp_path / "models.config"
  config.write_text(
    "model_config_list {"
    + "".join(f' config {{ name: "{name}" base_path: "{tmp_path / name}" }}' for name in ("bad", "stuck"))
    + " }"
  )
  stderr_path = tmp_path / "stderr.log"
  with open(stderr_path, "wb") as stderr:
    process = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "serving.model_servers.main",
        "--port=0",
        "--max_num_load_retries=0",
        f"--native={lib.NATIVE}",
        f"--model_config_file={config}",
      ],
      cwd=lib.REPO_ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=lib.REPO_ROOT),
      stdout=subprocess.DEVNULL,
      stderr=stderr,
    )
    try:
      code = process.wait(timeout=180)
    finally:
      if process.poll() is None:
        process.kill()
  log = stderr_path.read_text(errors="replace")
  assert code == 1, log[-3000:]
  assert "Failed to start server" in log
  assert "not waiting for the loads still running (model: stuck, version: 1)" in log


def test_rest_api_port_any_is_reported_by_the_process(server):
  """The session server runs with --rest_api_port=-1: REST gets a free port,
  reported on stdout and in --port_file as the gRPC port is."""
  with open(server.port_file) as f:
    ports = dict(line.split("=") for line in f.read().split())
  assert int(ports["rest"]) == server.rest_port > 0
  assert server.rest_port != server.grpc_port
  with open(server.stdout_path) as f:
    assert f"FGR_SERVE_REST_PORT={server.rest_port}" in f.read()
  url = f"http://127.0.0.1:{server.rest_port}/v1/models/{lib.TF1_MODEL}"
  with urllib.request.urlopen(url, timeout=60) as response:
    assert response.status == 200


@pytest.mark.usefixtures("native")
def test_rest_api_port_in_options(tmp_path):
  """REST_API_ANY_PORT binds a free port; 0 keeps REST off, as TF Serving."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  model = {"model_name": "m", "model_base_path": str(tmp_path / "m")}
  server = lib.InProcessServer(rest_api_port=server_lib.REST_API_ANY_PORT, **model)
  try:
    assert server.server.rest_port > 0
    url = f"http://127.0.0.1:{server.server.rest_port}/v1/models/m"
    with urllib.request.urlopen(url, timeout=60) as response:
      assert response.status == 200
  finally:
    server.stop()
  server = lib.InProcessServer(rest_api_port=0, **model)
  try:
    assert server.server.rest_port == 0
  finally:
    server.stop()
  with pytest.raises(errors.ServingError, match="--rest_api_port=-2"):
    lib.InProcessServer(rest_api_port=-2, **model)


@pytest.mark.usefixtures("native")
def test_shutdown_reports_not_serving_before_draining(tmp_path):
  """Stopping turns gRPC health NOT_SERVING for every service before REST
  drains, so load balancers stop sending gRPC calls while a REST call is
  still being answered. The REST call is held inside the server by an event
  the test sets, so the drain lasts exactly as long as the test needs."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(
    model_name="m",
    model_base_path=str(tmp_path / "m"),
    rest_api_port=lib.REST_ANY_PORT,
    enable_grpc_healthcheck_service=True,
  )
  api = server.server.api
  entered, release = threading.Event(), threading.Event()
  predict = api.predict_built

  def held_predict(*args, **kwargs):
    entered.set()
    release.wait()
    return predict(*args, **kwargs)

  api.predict_built = held_predict  # What the REST front end calls.
  health = health_pb2_grpc.HealthStub(server.channel)
  services = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")

  def statuses():
    return {health.Check(health_pb2.HealthCheckRequest(service=service), timeout=60).status for service in services}

  def rest_predict():
    request = urllib.request.Request(
      f"http://127.0.0.1:{server.server.rest_port}/v1/models/m:predict", data=b'{"instances": [2.0]}'
    )
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, response.read()

  assert statuses() == {health_pb2.HealthCheckResponse.SERVING}
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    rest_call = pool.submit(rest_predict)
    try:
      assert entered.wait(60)
      stopping = pool.submit(server.server.stop, 60)
      lib.wait_for(lambda: statuses() == {health_pb2.HealthCheckResponse.NOT_SERVING}, timeout=60)
      assert not rest_call.done() and not stopping.done()  # Still draining.
    finally:
      release.set()
    assert rest_call.result(timeout=120) == (200, b'{"predictions": [3.0]}')
    stopping.result(timeout=120)
  server.channel.close()


@pytest.mark.parametrize(
  "config_text, message",
  [
    ("model_config_list { config { name: 'm' ", "Failed to read ModelServerConfig"),
    (
      "model_config_list { config { name: 'm' base_path: '/x' } config { name: 'm' base_path: '/y' } }",
      "Illegal to list model m multiple times",
    ),
    (
      "model_config_list { config { name: 'm' base_path: '/x' model_platform: 'pytorch' } }",
      "requests unsupported platform pytorch",
    ),
  ],
)
@pytest.mark.usefixtures("native")
def test_bad_model_config_fails_start(tmp_path, config_text, message):
  config = tmp_path / "models.config"
  config.write_text(config_text)
  server = server_lib.Server(server_lib.Options(port=0, model_config_file=str(config), native=lib.NATIVE))
  with pytest.raises(errors.ServingError, match=message):
    server.start()
  server.stop(grace_seconds=0)


@pytest.mark.usefixtures("native")
def test_model_failing_at_start_up_fails_start(tmp_path):
  lib.write_broken(str(tmp_path / "m" / "1"))
  server = server_lib.Server(
    server_lib.Options(
      port=0,
      model_name="m",
      model_base_path=str(tmp_path / "m"),
      max_num_load_retries=1,
      load_retry_interval_micros=10000,
      native=lib.NATIVE,
    )
  )
  with pytest.raises(errors.ServingError, match="model: m, version: 1"):
    server.start()
  server.stop(grace_seconds=0)


@pytest.mark.usefixtures("native")
def test_unix_socket_only(tmp_path):
  """--grpc_socket_path with --port=0 serves gRPC on the socket alone."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  socket_path = str(tmp_path / "fgr.sock")
  server = server_lib.Server(
    server_lib.Options(
      port=0, grpc_socket_path=socket_path, model_name="m", model_base_path=str(tmp_path / "m"), native=lib.NATIVE
    )
  )
  server.start()
  channel = grpc.insecure_channel(f"unix:{socket_path}")
  try:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([4.0], dtype=tf.float32))
    response = lib.prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert response.outputs["y"].float_val == [4.0]
    assert server.grpc_port == 0
  finally:
    channel.close()
    server.stop(grace_seconds=1)


def test_python_m_main_keeps_tensorflow_s_start_up_lines_out_as_fgr_serve_does(tmp_path):
  """serving/README.md gives `python -m serving.model_servers.main` as fgr-serve's other entry point. It
  skipped cli.launch: TensorFlow's CUDA and CPU-feature notices, a cuInit ERROR and three C++ INFO
  lines per version load came out that fgr-serve keeps out."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLED_DEVICE_TYPES")}
  env["PYTHONPATH"] = lib.REPO_ROOT
  port_file = tmp_path / "ports"
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "serving.model_servers.main",
      "--port=0",
      f"--port_file={port_file}",
      "--model_name=m",
      f"--model_base_path={tmp_path / 'm'}",
    ],
    cwd=lib.REPO_ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    while not port_file.exists() and process.poll() is None:
      threading.Event().wait(0.1)
    assert port_file.exists(), process.communicate(timeout=60)[1][-3000:]
  finally:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert "Successfully loaded servable version" in stderr, stderr[-3000:]
  tf_lines = [line for line in stderr.splitlines() if re.match(r"\d{4}-\d\d-\d\d [\d:.]+: [IWEF] ", line)]
  assert tf_lines == [], stderr[-3000:]
