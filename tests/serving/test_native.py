"""The Python side of the native data plane (--native): mode choice, the fallback, routing, metrics,
and what only the native path does (padding variable-length inputs, Predict without Python).

Tests marked `native` below need the module (serving/native): they skip without it, or fail in CI.
The rest of the serving suite runs its server-starting tests once per --native mode (conftest's
`native_mode`).
"""

import concurrent.futures
import os
import re
import shutil
import socket
import time

import grpc
import numpy as np
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow_serving.apis import (
  classification_pb2,
  get_model_metadata_pb2,
  get_model_status_pb2,
  inference_pb2,
  model_management_pb2,
  predict_pb2,
  regression_pb2,
)

from serving import errors
from serving.core import loader, server_core
from serving.model_servers import native_server, rpc_methods
from serving.model_servers import server as server_lib
from serving.monitoring import metrics as metrics_lib
from serving.servables import native_bundle, request_limits
from tests import conftest as root_conftest

PREDICTION = "/tensorflow.serving.PredictionService/"
MODEL_SERVICE = "/tensorflow.serving.ModelService/"


def _predict_request(model=lib.TF1_MODEL, x=((2.0,),), signature=""):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model
  request.model_spec.signature_name = signature
  request.inputs["x"].CopyFrom(tf.make_tensor_proto(x, dtype=tf.float32))
  return request


def _examples_input(model_input, *xs):
  for x in xs:
    model_input.example_list.examples.add().features.feature["x"].float_list.value.append(x)


# --- --native=auto|on|off ----------------------------------------------------------------------


def test_off_never_loads_the_module(monkeypatch):
  monkeypatch.setattr(native_server, "load_module", lambda: pytest.fail("--native=off loaded the module"))
  assert native_server.choose("off") is None


def test_on_without_the_module_fails_with_the_reason(monkeypatch):
  monkeypatch.setattr(native_server, "load_module", lambda: (None, "not built: run `make install`"))
  with pytest.raises(errors.ServingError) as info:
    native_server.choose("on")
  assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
  assert "--native=on" in info.value.message and "not built: run `make install`" in info.value.message


def test_auto_without_the_module_serves_python_and_says_why_once(monkeypatch):
  monkeypatch.setattr(native_server, "load_module", lambda: (None, "not built: run `make install`"))
  lines = []
  monkeypatch.setattr(native_server.logging, "info", lambda message, *args: lines.append(message % args))
  assert native_server.choose("auto") is None
  assert len(lines) == 1 and "not built: run `make install`" in lines[0], lines


def test_unknown_mode_is_invalid_argument():
  with pytest.raises(errors.ServingError) as info:
    native_server.choose("maybe")
  assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_on_fails_the_start_up_without_the_module(tmp_path, monkeypatch):
  monkeypatch.setattr(native_server, "load_module", lambda: (None, "not built"))
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = server_lib.Server(
    server_lib.Options(port=0, model_name="m", model_base_path=str(tmp_path / "m"), native="on")
  )
  with pytest.raises(errors.ServingError, match="native data plane is unavailable: not built"):
    server.start()
  server.stop(grace_seconds=0)


@pytest.mark.usefixtures("native")
def test_a_taken_port_fails_the_start_up_and_the_next_server_still_serves(tmp_path):
  """A port in use is a clear start-up error; the failed server's gRPC queues are drained, so the
  process neither aborts nor keeps anything that stops the next server."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    server = server_lib.Server(
      server_lib.Options(
        port=taken.getsockname()[1], model_name="m", model_base_path=str(tmp_path / "m"), native=lib.NATIVE
      )
    )
    with pytest.raises(RuntimeError, match="Failed to bind gRPC server to 127.0.0.1"):
      server.start()
    server.stop(grace_seconds=0)
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"))
  try:
    response = server.predict.Predict(_predict_request("m", x=[1.0]), timeout=30)
    assert list(response.outputs["y"].float_val) == [2.5]
  finally:
    server.stop()


@pytest.mark.usefixtures("native_on")
def test_a_server_stopped_right_after_its_start_exits_cleanly(tmp_path):
  """Start, then stop at once, many times: its I/O threads may not have polled yet.

  Each thread once asked gRPC for its first call as it started; a stop that had already shut the
  queue down made that request abort the process (seen under Bazel in test_rest_api_port_in_options).
  """
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  for _ in range(15):
    server = server_lib.Server(
      server_lib.Options(port=0, model_name="m", model_base_path=str(tmp_path / "m"), native="on")
    )
    server.start()
    server.stop(grace_seconds=0)


def test_require_native_fails_in_ci_and_skips_elsewhere(monkeypatch):
  monkeypatch.setattr(native_server, "load_module", lambda: (None, "not built"))
  with pytest.raises(pytest.fail.Exception, match="CI=true"):
    root_conftest.require_native({"CI": "true"})
  with pytest.raises(pytest.skip.Exception, match="not built"):
    root_conftest.require_native({})


# --- The fallback: what the native front end hands to Python --------------------------------------


@pytest.fixture(scope="module")
def python_server(tmp_path_factory):
  """An in-process Python-path server with the TF1 half_plus_two (every RPC's signatures)."""
  root = tmp_path_factory.mktemp("fallback")
  lib.write_tf1_half_plus_two(str(root / lib.TF1_MODEL / "1"))
  server = lib.InProcessServer(model_name=lib.TF1_MODEL, model_base_path=str(root / lib.TF1_MODEL), native="off")
  yield server
  server.stop()


def _requests():
  """One valid request per method of both services, by method path."""
  classify = classification_pb2.ClassificationRequest()
  classify.model_spec.name, classify.model_spec.signature_name = lib.TF1_MODEL, "classify_x_to_y"
  _examples_input(classify.input, 2.0)
  regress = regression_pb2.RegressionRequest()
  regress.model_spec.name, regress.model_spec.signature_name = lib.TF1_MODEL, "regress_x_to_y"
  _examples_input(regress.input, 2.0, 4.0)
  multi = inference_pb2.MultiInferenceRequest()
  task = multi.tasks.add(method_name="tensorflow/serving/regress")
  task.model_spec.name, task.model_spec.signature_name = lib.TF1_MODEL, "regress_x_to_y"
  _examples_input(multi.input, 1.0)
  metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
  metadata.model_spec.name = lib.TF1_MODEL
  status = get_model_status_pb2.GetModelStatusRequest()
  status.model_spec.name = lib.TF1_MODEL
  return {
    PREDICTION + "Predict": _predict_request(),
    PREDICTION + "Classify": classify,
    PREDICTION + "Regress": regress,
    PREDICTION + "MultiInference": multi,
    PREDICTION + "GetModelMetadata": metadata,
    MODEL_SERVICE + "GetModelStatus": status,
  }


def _call(channel, path, request_bytes):
  """(code number, details, response bytes) of a raw gRPC call."""
  call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
  try:
    return 0, "", call(request_bytes, timeout=60)
  except grpc.RpcError as e:
    return e.code().value[0], e.details(), b""


def test_the_fallback_covers_every_method_of_both_services():
  paths = {m.path for m in rpc_methods.RPC_METHODS}
  assert paths == {
    PREDICTION + name for name in ("Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata")
  } | {MODEL_SERVICE + name for name in ("GetModelStatus", "HandleReloadConfigRequest")}


def test_the_fallback_answers_as_the_grpc_front_end(python_server):
  fallback = native_server.Fallback(python_server.server.api)
  methods = {m.path: m for m in rpc_methods.RPC_METHODS}
  for path, request in _requests().items():
    data = request.SerializeToString()
    code, message, response = fallback(path, data, 60_000)
    assert (code, message) == (0, ""), (path, message)
    expected = _call(python_server.channel, path, data)
    assert expected[0] == 0, (path, expected)
    response_type = methods[path].response_type
    assert response_type.FromString(response) == response_type.FromString(expected[2]), path
    # Malformed bytes: INVALID_ARGUMENT "Malformed <request>: ..." on both.
    code, message, _ = fallback(path, b"\xff\xff\xff", None)
    assert (code, message) == _call(python_server.channel, path, b"\xff\xff\xff")[:2], path
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and message.startswith("Malformed "), message


def test_the_fallback_reload_config_and_errors(python_server):
  fallback = native_server.Fallback(python_server.server.api)
  reload = model_management_pb2.ReloadConfigRequest()
  reload.config.CopyFrom(python_server.server.core.config)
  code, message, response = fallback(MODEL_SERVICE + "HandleReloadConfigRequest", reload.SerializeToString(), None)
  assert (code, message) == (0, "")
  assert model_management_pb2.ReloadConfigResponse.FromString(response).status.error_code == 0
  # A servable error: the ServingApi's code and message, as the gRPC front end answers.
  missing = _predict_request(model="missing").SerializeToString()
  answer = fallback(PREDICTION + "Predict", missing, None)
  assert answer == (grpc.StatusCode.NOT_FOUND.value[0], "Servable not found for request: Latest(missing)", b"")
  assert answer[:2] == _call(python_server.channel, PREDICTION + "Predict", missing)[:2]
  # Unknown methods are UNIMPLEMENTED.
  code, message, _ = fallback("/tensorflow.serving.PredictionService/Explain", b"", None)
  assert code == grpc.StatusCode.UNIMPLEMENTED.value[0] == 12 and "Explain" in message


def test_the_fallback_turns_any_exception_into_a_status(python_server, monkeypatch):
  def broken(*unused_args, **unused_kwargs):
    raise ValueError("boom")

  monkeypatch.setattr(python_server.server.api, "get_model_metadata", broken)
  request = _requests()[PREDICTION + "GetModelMetadata"].SerializeToString()
  code, message, response = native_server.Fallback(python_server.server.api)(
    PREDICTION + "GetModelMetadata", request, None
  )
  assert (code, message, response) == (grpc.StatusCode.INTERNAL.value[0], "ValueError: boom", b"")


# --- Routing: what ServerCore tells the native front end ------------------------------------------


class _RecordingRouter:
  def __init__(self, events):
    self.events = events

  def set_model(self, name, versions, labels):
    self.events.append(("route", name, sorted(versions), dict(labels)))
    for version, bundle in versions.items():
      if not getattr(bundle, "_recorded", False):
        bundle._recorded = True
        bundle.on_close(lambda version=version: self.events.append(("close", name, version)))


def test_versions_leave_the_routes_before_their_unload_and_join_once_available(tmp_path):
  base = tmp_path / "m"
  lib.write_tf2_half_plus_two(str(base / "1"))
  events = []
  core = server_core.ServerCore(
    loader.LoaderOptions(enable_warmup=False, max_num_load_retries=0), router=_RecordingRouter(events)
  )
  config = server_core.single_model_config("m", str(base))
  try:
    core.reload_config(config)
    assert events == [("route", "m", [1], {})]
    lib.write_tf2_half_plus_two(str(tmp_path / "staging"), b=3.0)
    shutil.move(str(tmp_path / "staging"), str(base / "2"))
    core.poll()
    lib.wait_for(lambda: ("close", "m", 1) in events)
    # v2 joins once loaded (both serve meanwhile); v1 leaves, and only then is it closed.
    assert events == [
      ("route", "m", [1], {}),
      ("route", "m", [1, 2], {}),
      ("route", "m", [2], {}),
      ("close", "m", 1),
    ]
    labelled = server_core.single_model_config("m", str(base))
    labelled.model_config_list.config[0].version_labels["stable"] = 2
    core.reload_config(labelled)
    assert events[-1] == ("route", "m", [2], {"stable": 2})
    core.reload_config(labelled)  # Unchanged labels: nothing to tell.
    assert events[-1] == ("route", "m", [2], {"stable": 2}) and len(events) == 5
  finally:
    core.stop()
  assert events[-2:] == [("route", "m", [], {"stable": 2}), ("close", "m", 2)]


class _FakeNativeServer:
  def __init__(self):
    self.calls = []

  def set_model(self, name, versions, labels):
    self.calls.append((name, versions, labels))


class _Bundle:
  def __init__(self, version):
    self.servable = f"servable{version}"


def test_routes_pass_servables_and_only_labels_the_native_side_serves():
  routes = native_server.Routes()
  routes.set_model("m", {1: _Bundle(1), 2: _Bundle(2)}, {"stable": 1, "next": 3})
  routes.set_model("gone", {1: _Bundle(1)}, {})
  routes.set_model("gone", {}, {})
  server = _FakeNativeServer()
  routes.attach(server)  # Routes published before the port opened are handed over.
  assert server.calls == [("m", {1: "servable1", 2: "servable2"}, {"stable": 1})]
  routes.set_model("m", {2: _Bundle(2)}, {"stable": 1})
  assert server.calls[-1] == ("m", {2: "servable2"}, {})  # "stable" falls back to Python now.
  routes.attach(None)
  routes.set_model("m", {}, {})
  assert len(server.calls) == 2


# --- Metrics: one family each, both sides counted -------------------------------------------------


class _FakeNativeMetrics:
  def __init__(self):
    latency = [0] * (len(metrics_lib.LATENCY_BUCKETS_US) + 1)
    latency[5] = 3
    rows = [0] * (len(metrics_lib.BATCH_BUCKETS) + 1)
    rows[2] = 2
    padding = [0] * (len(metrics_lib.BATCH_BUCKETS) + 1)
    padding[0] = 2
    self.value = {
      "requests": [("m", "predict", "GRPC", "OK", 3, 600.0, latency)],
      "batches": [("m", 2, 7, rows, 2, padding)],
    }

  def snapshot(self):
    return self.value


def test_native_counts_add_to_the_python_families():
  metrics = metrics_lib.Metrics()
  metrics.record_request("m", "predict", "REST", "OK", 0.001)
  metrics.record_request("m", "predict", "GRPC", "NOT_FOUND", 0.002)
  metrics.batch_observer("m")(4, 0)
  metrics.attach_native(_FakeNativeMetrics())
  text = metrics.exposition().decode()
  for family in ("request_count", "request_latency", "processed_batch_size", "padding_size"):
    assert len(re.findall(rf"^# TYPE \S*{family}\S* (counter|histogram)$", text, re.M)) == 1, family
  registry = metrics.registry
  assert registry.get_sample_value(":tensorflow:serving:request_count_total", {"model_name": "m", "status": "OK"}) == 4
  assert (
    registry.get_sample_value(":tensorflow:serving:request_count_total", {"model_name": "m", "status": "NOT_FOUND"})
    == 1
  )
  grpc_labels = {"model_name": "m", "API": "predict", "entrypoint": "GRPC"}
  assert registry.get_sample_value(":tensorflow:serving:request_latency_count", grpc_labels) == 4
  assert registry.get_sample_value(":tensorflow:serving:request_latency_sum", grpc_labels) == pytest.approx(2600.0)
  le = {**grpc_labels, "le": "+Inf"}
  assert registry.get_sample_value(":tensorflow:serving:request_latency_bucket", le) == 4
  batch = {"model_name": "m"}
  assert registry.get_sample_value(":tensorflow:serving:batching_session:processed_batch_size_count", batch) == 3
  assert registry.get_sample_value(":tensorflow:serving:batching_session:processed_batch_size_sum", batch) == 11
  assert registry.get_sample_value(":tensorflow:serving:batching_session:padding_size_sum", batch) == 2


# --- Native only ----------------------------------------------------------------------------------


@pytest.fixture
def native_on():
  root_conftest.require_native()


class _FirstColumn(tf.Module):
  """y = 2 * x[:, 0] for x [N, ?]: right whatever the inner padding."""

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="x")])
  def serve(self, x):
    return {"y": 2.0 * x[:, 0]}


def _batch_stats(server):
  registry = server.server.metrics.registry
  labels = {"model_name": "m"}
  return tuple(
    registry.get_sample_value(f":tensorflow:serving:batching_session:{name}", labels) or 0
    for name in ("processed_batch_size_count", "processed_batch_size_sum", "padding_size_sum")
  )


@pytest.mark.usefixtures("native_on")
def test_native_batching_pads_variable_length_inputs_and_batch_sizes(tmp_path):
  tf.saved_model.save(_FirstColumn(), str(tmp_path / "m" / "1"), signatures={"serving_default": _FirstColumn().serve})
  # A batch runs once full (8 rows) or after an hour: 8 concurrent one-row requests of 8 different
  # lengths make exactly one batch, padded inside to the longest.
  server = lib.batching_server(
    tmp_path,
    "max_batch_size { value: 8 } batch_timeout_micros { value: 3600000000 } num_batch_threads { value: 1 } "
    "allowed_batch_sizes: 4 allowed_batch_sizes: 8 pad_variable_length_inputs: true",
    native="on",
  )
  try:

    def predict(i, rows=1):
      x = np.full((rows, i + 1), float(i), np.float32)
      x[:, 1:] = -1.0
      request = predict_pb2.PredictRequest()
      request.model_spec.name = "m"
      request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
      return list(server.predict.Predict(request, timeout=120).outputs["y"].float_val)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      results = list(pool.map(predict, range(8)))
    assert results == [[2.0 * i] for i in range(8)]
    assert _batch_stats(server) == (1, 8, 0)
    # Requests of 3, 3 and 2 rows and three lengths fill the next batch of 8, whatever their order.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      results = list(pool.map(predict, (3, 4, 5), (3, 3, 2)))
    assert results == [[6.0] * 3, [8.0] * 3, [10.0] * 2]
    assert _batch_stats(server) == (2, 16, 0)
  finally:
    server.stop()


class _JoinedRow(tf.Module):
  """y = each row of the string matrix x [N, ?] joined: padding with "" leaves a row's answer as is."""

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name="x")])
  def serve(self, x):
    return {"y": tf.strings.reduce_join(x, axis=1)}


@pytest.mark.usefixtures("native_on")
def test_native_batching_pads_a_request_without_elements(tmp_path):
  """A [1, 0] request batched with a [1, 3] one has no first element to pad with: it gets "" (it crashed)."""
  tf.saved_model.save(_JoinedRow(), str(tmp_path / "m" / "1"), signatures={"serving_default": _JoinedRow().serve})
  server = lib.batching_server(
    tmp_path,
    "max_batch_size { value: 2 } batch_timeout_micros { value: 3600000000 } num_batch_threads { value: 1 } "
    "pad_variable_length_inputs: true",
    native="on",
  )
  try:

    def predict(values):
      request = predict_pb2.PredictRequest()
      request.model_spec.name = "m"
      request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([values], dtype=object).reshape(1, len(values))))
      return list(server.predict.Predict(request, timeout=120).outputs["y"].string_val)

    for rows in ([["a", "b", "c"], []], [[], ["a", "b", "c"]]):  # The empty part first and last.
      with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(predict, rows))
      assert results == [[b"".join(v.encode() for v in values)] for values in rows]
    assert _batch_stats(server)[:2] == (2, 4)
  finally:
    server.stop()


@pytest.mark.usefixtures("native_on")
def test_native_batching_pads_to_allowed_batch_sizes(tmp_path):
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.batching_server(
    tmp_path,
    "max_batch_size { value: 8 } batch_timeout_micros { value: 0 } allowed_batch_sizes: 4 allowed_batch_sizes: 8",
    native="on",
  )
  try:
    for _ in range(3):  # One at a time: each batch holds one 3-row request, padded to 4.
      response = server.predict.Predict(_predict_request("m", x=[1.0, 2.0, 3.0]), timeout=60)
      assert list(response.outputs["y"].float_val) == [2.5, 3.0, 3.5]
    assert _batch_stats(server) == (3, 9, 3)
  finally:
    server.stop()


@pytest.mark.usefixtures("native_on")
def test_native_predict_needs_no_python_and_the_rest_falls_back(tmp_path, monkeypatch):
  """The native front end answers Predict itself (Python's Predict is broken here), hands every other
  call and every Predict it can't answer to Python, and counts both in one metrics family."""
  lib.write_tf1_half_plus_two(str(tmp_path / lib.TF1_MODEL / "1"))
  server = lib.InProcessServer(
    model_name=lib.TF1_MODEL, model_base_path=str(tmp_path / lib.TF1_MODEL), native="on", rest_api_port=-1
  )
  try:

    def no_python(*unused_args, **unused_kwargs):
      raise AssertionError("Python answered a Predict the native path should have")

    monkeypatch.setattr(server.server.api, "predict", no_python)
    for _ in range(3):
      assert server.predict.Predict(_predict_request(), timeout=60).outputs["y"].float_val == [3.0]
    # Not answerable natively (unknown model): Python's ServingApi.predict answers (here: raises).
    code, details = lib.grpc_code(server.predict.Predict, _predict_request(model="missing"))
    assert code == grpc.StatusCode.INTERNAL and "Python answered" in details
    monkeypatch.undo()
    code, details = lib.grpc_code(server.predict.Predict, _predict_request(model="missing"))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(missing)")
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = lib.TF1_MODEL
    (version_status,) = server.model.GetModelStatus(status, timeout=60).model_version_status
    assert version_status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    code, body = lib.post_json(server.server.rest_port, f"/v1/models/{lib.TF1_MODEL}:predict", b'{"instances": [[1]]}')
    assert (code, body) == (200, {"predictions": [[2.5]]})
    registry = server.server.metrics.registry
    labels = {"model_name": lib.TF1_MODEL, "API": "predict"}
    assert registry.get_sample_value(":tensorflow:serving:request_latency_count", {**labels, "entrypoint": "GRPC"}) == 3
    missing = {"model_name": metrics_lib.UNKNOWN_MODEL, "status": "NOT_FOUND"}
    assert registry.get_sample_value(":tensorflow:serving:request_count_total", missing) == 1
    assert registry.get_sample_value(":tensorflow:serving:request_latency_count", {**labels, "entrypoint": "REST"}) == 1
  finally:
    server.stop()


@pytest.mark.usefixtures("native_on")
def test_native_load_gives_the_load_thread_back_its_cpus_and_priority(tmp_path):
  module, _ = native_server.load_module()
  runtime = native_bundle.NativeRuntime(module, module.Metrics([1.0], [1.0]), request_limits.ExpansionLimits())
  before = os.sched_getaffinity(0), os.sched_getscheduler(0)
  bundle = native_bundle.NativeBundle("m", 1, lib.write_tf2_half_plus_two(str(tmp_path / "1")), runtime)
  try:
    assert (os.sched_getaffinity(0), os.sched_getscheduler(0)) == before
    signature = bundle.signature_defs["serving_default"]
    feeds = {signature.inputs["x"].name: np.array([2.0], np.float32)}
    assert bundle.runner(feeds, [signature.outputs["y"].name])[0].tolist() == [3.0]
    assert bundle.session_run(feeds, [signature.outputs["y"].name])[0].tolist() == [3.0]
  finally:
    bundle.close()
  with pytest.raises(errors.ServingError) as info:
    bundle.session_run(feeds, [signature.outputs["y"].name])
  assert info.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.usefixtures("native_on")
def test_native_requests_leave_nothing_behind(tmp_path):
  """Batched, unbatchable, cancelled and refused Predicts all free their native state once answered.

  A reference cycle (a queued task's callback holding the call's state, which held the task) once
  kept every batched request, its tensors and outputs alive: about 12 KB a request at 100k ads.
  """
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.batching_server(
    tmp_path,
    "max_batch_size { value: 8 } batch_timeout_micros { value: 500 } num_batch_threads { value: 2 }",
    native="on",
  )
  native, _ = native_server.load_module()
  try:

    def predict(i):
      rows = [float(i)] * (1 + i % 3)
      return list(server.predict.Predict(_predict_request("m", x=rows), timeout=60).outputs["y"].float_val)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      results = list(pool.map(predict, range(200)))
    assert results == [[0.5 * i + 2.0] * (1 + i % 3) for i in range(200)]
    code, _ = lib.grpc_code(server.predict.Predict, _predict_request("nope"))  # Falls back to Python.
    assert code == grpc.StatusCode.NOT_FOUND
    for _ in range(20):  # Deadlines that pass in the queue or the run (or not: either way, no leftovers).
      try:
        server.predict.Predict(_predict_request("m", x=[1.0]), timeout=0.0005)
      except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Answers reach the client before the native side drops its last references: wait for them.
    deadline = time.monotonic() + 30
    while native.live_counts() != {"tasks": 0, "calls": 0, "tensors": 0} and time.monotonic() < deadline:
      time.sleep(0.05)
    assert native.live_counts() == {"tasks": 0, "calls": 0, "tensors": 0}
  finally:
    server.stop()


class _Spinning(tf.Module):
  """y = x + 1 after `spins` products of a 64 x 64 matrix: a request holds its thread as long as asked."""

  @tf.function(input_signature=[tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.int32)])
  def serve(self, x, spins):
    def spin(i, m):
      return i + 1, tf.math.l2_normalize(tf.matmul(m, m))  # Normalised: stays finite however long.

    _, m = tf.while_loop(lambda i, m: i < spins, spin, (0, tf.ones([64, 64]) / 64.0))
    return {"y": x + 1.0 + 0.0 * tf.reduce_sum(m)}


def _spinning_request(i: int, spins: int) -> predict_pb2.PredictRequest:
  """A Predict of `_Spinning` model "m": answers [i + 1] after `spins` products."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "m"
  request.inputs["x"].CopyFrom(tf.make_tensor_proto([float(i)], dtype=tf.float32))
  request.inputs["spins"].CopyFrom(tf.make_tensor_proto(spins, dtype=tf.int32))
  return request


def _spins_lasting(predict_stub, seconds: float) -> int:
  """Spins a served `_Spinning` call takes about `seconds` for, timed on this machine: a test that needs
  a call to outlast others must not depend on how fast the CPU it runs on is."""
  spins = 2_000
  predict_stub.Predict(_spinning_request(0, 1), timeout=300)  # The first run's one-off costs, untimed.
  started = time.monotonic()
  predict_stub.Predict(_spinning_request(0, spins), timeout=300)
  return max(spins, int(spins * seconds / max(time.monotonic() - started, 1e-4)))


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("inter_op_parallelism", [0, -1, 2])
def test_unbatched_predicts_outnumbering_the_queue_threads_are_all_answered(tmp_path, inter_op_parallelism):
  """Unbatched runs happen on the threads that take turns at the gRPC queue (five here): the one that
  read a request runs it after handing the queue to an idle one, and when none is idle, the request
  waits for the first to free up while the queue is still polled. 24 concurrent slow requests keep
  every thread busy; each gets its own answer, a passed deadline is DEADLINE_EXCEEDED, and nothing
  stays behind. Their ops run in that thread too (TF's caller-thread mode) unless
  inter_op_parallelism_threads asks for a pool (2 here)."""
  module = _Spinning()
  tf.saved_model.save(module, str(tmp_path / "m" / "1"), signatures={"serving_default": module.serve})
  server = lib.InProcessServer(
    model_name="m",
    model_base_path=str(tmp_path / "m"),
    native="on",
    session_config=config_pb2.ConfigProto(inter_op_parallelism_threads=inter_op_parallelism),
  )
  native, _ = native_server.load_module()
  try:

    def predict(i):
      return list(server.predict.Predict(_spinning_request(i, 200 if i % 2 else 1), timeout=120).outputs["y"].float_val)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
      results = list(pool.map(predict, range(96)))
    assert results == [[i + 1.0] for i in range(96)]
    # A deadline that passes during a long run: the client gets DEADLINE_EXCEEDED (in the caller thread
    # TF cannot cut the run short, so the thread finishes it, then finds the call answered).
    long_run = _spins_lasting(server.predict, 0.5)  # 25 times the deadline.
    code, _ = lib.grpc_code(server.predict.Predict, _spinning_request(0, long_run), timeout=0.02)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert predict(3) == [4.0]
    lib.wait_for(lambda: native.live_counts() == {"tasks": 0, "calls": 0, "tensors": 0})
  finally:
    server.stop()


@pytest.mark.usefixtures("native_on")
def test_a_call_batching_cannot_take_runs_off_the_queue_thread(tmp_path):
  """With batching on, a call whose feeds cannot be batched (a scalar here) runs whole, as
  BatchingSession runs it, but not on the thread polling the gRPC queue: while a long one runs, other
  calls are still read and answered."""
  module = _Spinning()
  tf.saved_model.save(module, str(tmp_path / "m" / "1"), signatures={"serving_default": module.serve})
  server = lib.batching_server(
    tmp_path,
    "max_batch_size { value: 8 } batch_timeout_micros { value: 1000 } num_batch_threads { value: 1 }",
    native="on",
  )
  native, _ = native_server.load_module()
  try:

    def predict(i, spins):
      return list(server.predict.Predict(_spinning_request(i, spins), timeout=300).outputs["y"].float_val)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      # About 2 s: 100 times what the short calls below take. The sleep lets it start; were it late,
      # the short calls would pass without testing anything, never fail.
      long_call = pool.submit(predict, -1, _spins_lasting(server.predict, 2.0))
      time.sleep(0.3)
      assert [predict(i, 1) for i in range(8)] == [[i + 1.0] for i in range(8)]
      assert not long_call.done(), "short calls waited for the long one"
      assert long_call.result() == [0.0]
    lib.wait_for(lambda: native.live_counts() == {"tasks": 0, "calls": 0, "tensors": 0})
  finally:
    server.stop()


class _SumAll(tf.Module):
  """s = sum of x: a scalar output."""

  @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
  def serve(self, x):
    return {"s": tf.reduce_sum(x)}


@pytest.mark.parametrize("native", ["on", "off"])
def test_scalar_outputs_carry_an_empty_shape_on_both_paths(tmp_path, native):
  """TF Serving sets tensor_shape {} for a scalar; clients test HasField (native left it unset)."""
  if native == "on":
    root_conftest.require_native()
  tf.saved_model.save(_SumAll(), str(tmp_path / "m" / "1"), signatures={"serving_default": _SumAll().serve})
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"), native=native)
  try:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0, 2.0], dtype=tf.float32))
    output = server.predict.Predict(request, timeout=60).outputs["s"]
    assert output.HasField("tensor_shape") and not output.tensor_shape.dim and list(output.float_val) == [3.0]
  finally:
    server.stop()
