"""gRPC API tests modelled on TF Serving's tensorflow_model_server_test."""

import re
import urllib.request

import grpc
import numpy as np
import pytest
import serving_testlib as lib
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_testlib import KERAS_MODEL, TF1_MODEL, TF1_VERSION, TF2_MODEL
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow_serving.apis import (
  classification_pb2,
  get_model_metadata_pb2,
  get_model_status_pb2,
  inference_pb2,
  predict_pb2,
  prediction_service_pb2_grpc,
  regression_pb2,
)

State = get_model_status_pb2.ModelVersionStatus.State


def _predict_request(model=TF1_MODEL, x=((2.0,),), signature="", version=None, label=None, output_filter=()):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model
  request.model_spec.signature_name = signature
  if version is not None:
    request.model_spec.version.value = version
  if label is not None:
    request.model_spec.version_label = label
  request.inputs["x"].CopyFrom(tf.make_tensor_proto(x, dtype=tf.float32))
  request.output_filter.extend(output_filter)
  return request


def _example(**features):
  example = tf.train.Example()
  for key, value in features.items():
    example.features.feature[key].float_list.value.append(value)
  return example


def _error(call, request):
  with pytest.raises(grpc.RpcError) as info:
    call(request, timeout=30)
  return info.value.code(), info.value.details()


def test_predict_tf1(server):
  response = server.predict.Predict(_predict_request(), timeout=30)
  assert response.outputs["y"].float_val == [3.0]  # Typed field, as TF Serving.
  assert response.model_spec.name == TF1_MODEL
  assert response.model_spec.version.value == TF1_VERSION
  assert response.model_spec.signature_name == "serving_default"


def test_predict_tf2_latest_specific_and_label(server):
  latest = server.predict.Predict(_predict_request(TF2_MODEL, x=[1.0, 2.0]), timeout=30)
  assert tf.make_ndarray(latest.outputs["y"]).tolist() == [3.5, 4.0]
  assert latest.model_spec.version.value == 2
  v1 = server.predict.Predict(_predict_request(TF2_MODEL, x=[2.0], version=1), timeout=30)
  assert v1.outputs["y"].float_val == [3.0]
  stable = server.predict.Predict(_predict_request(TF2_MODEL, x=[2.0], label="stable"), timeout=30)
  assert stable.model_spec.version.value == 1


def test_predict_keras(server):
  request = _predict_request(KERAS_MODEL, x=[[2.0], [4.0]])
  response = server.predict.Predict(request, timeout=30)
  (alias,) = response.outputs
  assert tf.make_ndarray(response.outputs[alias]).tolist() == [[3.0], [4.0]]


def test_predict_scann_ops(server):
  """The server imports scann, so Scann>... ops in a SavedModel load."""
  queries = lib.SCANN_DATABASE[:3] + 0.1
  request = predict_pb2.PredictRequest()
  request.model_spec.name = lib.SCANN_MODEL
  request.inputs["q"].CopyFrom(tf.make_tensor_proto(queries))
  response = server.predict.Predict(request, timeout=30)
  # ScaNN and NumPy sum the dot products in different orders, so near-ties
  # may rank either way: compare scores with a tolerance, and check each
  # returned id's exact score is the expected one at its rank.
  exact = queries.astype(np.float64) @ lib.SCANN_DATABASE.T.astype(np.float64)
  top = -np.sort(-exact, axis=1)[:, :5]
  ids = tf.make_ndarray(response.outputs["ids"])
  np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]), top, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.take_along_axis(exact, ids, axis=1), top, rtol=1e-4, atol=1e-4)


def test_predict_output_filter(server):
  response = server.predict.Predict(_predict_request(signature="predict_two_outputs", output_filter=["y"]), timeout=30)
  assert list(response.outputs) == ["y"]
  both = server.predict.Predict(_predict_request(signature="predict_two_outputs"), timeout=30)
  assert sorted(both.outputs) == ["x_out", "y"]


@pytest.mark.parametrize(
  "mutate, code, message",
  [
    (
      lambda r: setattr(r.model_spec, "name", "missing"),
      grpc.StatusCode.NOT_FOUND,
      "Servable not found for request: Latest(missing)",
    ),
    (
      lambda r: r.model_spec.version.__setattr__("value", 999),
      grpc.StatusCode.NOT_FOUND,
      f"Servable not found for request: Specific({TF1_MODEL}, 999)",
    ),
    (
      lambda r: setattr(r.model_spec, "version_label", "nope"),
      grpc.StatusCode.INVALID_ARGUMENT,
      "Unrecognized servable version label",
    ),
    (
      lambda r: setattr(r.model_spec, "signature_name", "nope"),
      grpc.StatusCode.FAILED_PRECONDITION,
      'Serving signature key "nope" not found.',
    ),
    (lambda r: r.inputs.pop("x"), grpc.StatusCode.INVALID_ARGUMENT, "input size does not match signature: 0!=1"),
    (lambda r: r.inputs["extra"].CopyFrom(r.inputs["x"]), grpc.StatusCode.INVALID_ARGUMENT, "Sent extra: {extra}"),
    (
      lambda r: r.inputs["x"].CopyFrom(tf.make_tensor_proto([["a"]])),
      grpc.StatusCode.INVALID_ARGUMENT,
      "to be float but string is provided",
    ),
    (
      lambda r: r.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0, 2.0])),
      grpc.StatusCode.INVALID_ARGUMENT,
      "has shape [2]",
    ),
    (
      lambda r: r.output_filter.append("nope"),
      grpc.StatusCode.INVALID_ARGUMENT,
      "output tensor alias not found in signature: nope",
    ),
    (
      lambda r: r.output_filter.extend(["y", "y"]),
      grpc.StatusCode.INVALID_ARGUMENT,
      "duplicate output tensor alias: y",
    ),
    (
      lambda r: setattr(r.inputs["x"], "tensor_content", b"\x00" * 3),
      grpc.StatusCode.INVALID_ARGUMENT,
      "tensor parsing error: x",
    ),
    (
      lambda r: r.inputs["x"].tensor_shape.dim[0].__setattr__("size", 10**12),
      grpc.StatusCode.INVALID_ARGUMENT,
      "tensor parsing error: x",
    ),
  ],
)
def test_predict_errors(server, mutate, code, message):
  request = _predict_request()
  mutate(request)
  got_code, details = _error(server.predict.Predict, request)
  assert got_code == code
  assert message in details
  if code != grpc.StatusCode.NOT_FOUND and "label" not in message:
    assert f"model: {TF1_MODEL}, version: {TF1_VERSION}" in details


@pytest.mark.parametrize(
  "mutate, code, message",
  [
    (lambda r: setattr(r.model_spec, "name", "m" * 100_000), grpc.StatusCode.NOT_FOUND, "Servable not found"),
    # 3 bytes a character, 9 once percent-encoded: the cut counts bytes, not characters.
    (lambda r: setattr(r.model_spec, "name", "模" * 40_000), grpc.StatusCode.NOT_FOUND, "Servable not found"),
    (
      lambda r: setattr(r.model_spec, "signature_name", "s" * 100_000),
      grpc.StatusCode.FAILED_PRECONDITION,
      "Serving signature key",
    ),
    (
      lambda r: [r.inputs[f"{i:03d}" + "e" * 600].CopyFrom(r.inputs["x"]) for i in range(200)],
      grpc.StatusCode.INVALID_ARGUMENT,
      "input size does not match signature: 201!=1",
    ),
  ],
)
def test_errors_echoing_long_requests_keep_their_code(server, mutate, code, message):
  """A message repeating 100 KB the client sent is cut: whole, it would exceed gRPC's trailer limit and
  reach the client as RESOURCE_EXHAUSTED instead."""
  request = _predict_request()
  mutate(request)
  got_code, details = _error(server.predict.Predict, request)
  assert (got_code, message in details) == (code, True)
  assert len(details.encode()) < 2_100 and "more bytes" in details


def test_predict_on_the_init_op_signature_is_invalid(server):
  """A TF2 SavedModel lists `__saved_model_init_op`, whose output is an op, not a tensor."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = TF2_MODEL
  request.model_spec.signature_name = "__saved_model_init_op"
  code, details = _error(server.predict.Predict, request)
  assert (code, "is not a tensor of the graph" in details) == (grpc.StatusCode.INVALID_ARGUMENT, True)


def test_errors_whose_message_is_not_utf8_keep_their_code(server):
  """ParseExample echoes the request's bytes in its INVALID_ARGUMENT; TF's Python binding raised a
  UnicodeDecodeError for it, which answered INTERNAL on the Python path."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = TF1_MODEL
  request.model_spec.signature_name = "regress_x_to_y"
  request.inputs["inputs"].CopyFrom(tf.make_tensor_proto([b"\xff\xfe junk"]))
  code, details = _error(server.predict.Predict, request)
  assert code == grpc.StatusCode.INVALID_ARGUMENT and "Could not parse example input" in details


@pytest.mark.parametrize("rank", [70, 300])
def test_a_tensor_of_too_many_dimensions_is_refused_and_the_server_serves_on(server, rank):
  """NumPy decodes at most 64 dimensions (it raised ValueError: INTERNAL); TF aborts the process on a
  shape of more than 254 (the native path allocated one)."""
  request = _predict_request()
  request.inputs["x"].tensor_shape.dim.extend([tensor_shape_pb2.TensorShapeProto.Dim(size=1)] * (rank - 2))
  code, details = _error(server.predict.Predict, request)
  assert code == grpc.StatusCode.INVALID_ARGUMENT and f"x: {rank} dimensions" in details
  assert list(server.predict.Predict(_predict_request(), timeout=30).outputs["y"].float_val) == [3.0]


def test_request_metadata_has_one_limit_on_both_paths(server):
  """Headers up to 16 KiB pass every time (grpcio alone refuses 8-16 KiB at random), beyond they fail."""
  for _ in range(20):
    response = server.predict.Predict(_predict_request(), timeout=30, metadata=[("x-token", "a" * 15_000)])
    assert list(response.outputs["y"].float_val) == [3.0]
  # On a connection of its own (channels to one address share connections unless told not to): the
  # native server's gRPC 1.51 closes the connection over it, failing the other calls on it.
  options = [("grpc.use_local_subchannel_pool", 1)]
  with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=options) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    code, _ = lib.grpc_code(
      lambda request, timeout: stub.Predict(request, timeout=timeout, metadata=[("x-token", "a" * 17_000)]),
      _predict_request(),
    )
  assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def _ok_count(server, model: str) -> float:
  """request_count{model_name=model, status="OK"} from the server's Prometheus endpoint."""
  url = f"http://127.0.0.1:{server.rest_port}/monitoring/prometheus/metrics"
  with urllib.request.urlopen(url, timeout=60) as response:
    text = response.read().decode()
  found = re.search(rf':tensorflow:serving:request_count_total\{{model_name="{model}",status="OK"\}} (\S+)', text)
  return float(found.group(1)) if found else 0.0


def _code(future: grpc.Future) -> grpc.StatusCode:
  try:
    future.result()
  except grpc.RpcError as e:
    return e.code()
  return grpc.StatusCode.OK


def test_a_burst_of_concurrent_calls_is_answered_and_counted(server):
  """4,000 calls at once over 10 connections are all answered OK and counted.

  Above grpcio's default backlog (1,000 calls waiting for the Python path's event loop, 3,000 at
  most), gRPC core cancelled the rest: CANCELLED, and never counted, since the server never saw them.
  """
  count = 4000
  before = _ok_count(server, TF2_MODEL)
  # A subchannel pool of their own: each channel its own connection.
  channels = [
    grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
    for _ in range(10)
  ]
  try:
    stubs = [prediction_service_pb2_grpc.PredictionServiceStub(channel) for channel in channels]
    request = _predict_request(model=TF2_MODEL, x=(1.0, 2.0))
    futures = [stubs[i % len(stubs)].Predict.future(request, timeout=300) for i in range(count)]
    codes = [_code(future) for future in futures]
  finally:
    for channel in channels:
      channel.close()
  assert codes.count(grpc.StatusCode.OK) == count, {code: codes.count(code) for code in set(codes)}
  lib.wait_for(lambda: _ok_count(server, TF2_MODEL) == before + count)


def test_classify(server):
  request = classification_pb2.ClassificationRequest()
  request.model_spec.name = TF1_MODEL
  request.model_spec.signature_name = "classify_x_to_y"
  request.input.example_list.examples.extend([_example(x=2.0), _example(x=4.0)])
  response = server.predict.Classify(request, timeout=30)
  scores = [c.classes[0].score for c in response.result.classifications]
  assert scores == [3.0, 4.0]
  assert response.model_spec.version.value == TF1_VERSION


def test_regress_with_context(server):
  request = regression_pb2.RegressionRequest()
  request.model_spec.name = TF1_MODEL
  request.model_spec.signature_name = "regress_x2_to_y3"
  with_context = request.input.example_list_with_context
  with_context.context.CopyFrom(_example(x2=2.0))
  with_context.examples.extend([_example(x=1.0), _example(x=1.0)])
  response = server.predict.Regress(request, timeout=30)
  assert [r.value for r in response.result.regressions] == [4.0, 4.0]


def test_classify_regress_errors(server):
  request = classification_pb2.ClassificationRequest()
  request.model_spec.name = TF1_MODEL  # serving_default: x -> y, no examples.
  request.input.example_list.examples.add()
  code, details = _error(server.predict.Classify, request)
  assert code == grpc.StatusCode.INVALID_ARGUMENT
  # Its method (predict) is not checked by default, as in TF Serving: its
  # inputs are what rule it out.
  assert "No classification inputs found in SignatureDef" in details
  empty = regression_pb2.RegressionRequest()
  empty.model_spec.name = TF1_MODEL
  empty.model_spec.signature_name = "regress_x_to_y"
  code, details = _error(server.predict.Regress, empty)
  assert (code, "Input is empty." in details) == (grpc.StatusCode.INVALID_ARGUMENT, True)


def test_multi_inference(server):
  request = inference_pb2.MultiInferenceRequest()
  for signature, method in (
    ("classify_x_to_y", "tensorflow/serving/classify"),
    ("regress_x2_to_y3", "tensorflow/serving/regress"),
  ):
    task = request.tasks.add(method_name=method)
    task.model_spec.name = TF1_MODEL
    task.model_spec.signature_name = signature
  request.input.example_list.examples.add().CopyFrom(_example(x=2.0, x2=2.0))
  response = server.predict.MultiInference(request, timeout=30)
  classify, regress = response.results
  assert classify.classification_result.classifications[0].classes[0].score == (3.0)
  assert regress.regression_result.regressions[0].value == 4.0
  assert regress.model_spec.signature_name == "regress_x2_to_y3"
  request.tasks[1].model_spec.signature_name = "classify_x_to_y"
  code, details = _error(server.predict.MultiInference, request)
  assert code == grpc.StatusCode.INVALID_ARGUMENT
  assert "Duplicate evaluation of signature: classify_x_to_y" in details


def test_get_model_metadata(server):
  request = get_model_metadata_pb2.GetModelMetadataRequest()
  request.model_spec.name = TF1_MODEL
  request.metadata_field.append("signature_def")
  response = server.predict.GetModelMetadata(request, timeout=30)
  assert response.model_spec.version.value == TF1_VERSION
  signatures = get_model_metadata_pb2.SignatureDefMap()
  assert response.metadata["signature_def"].Unpack(signatures)
  assert {"serving_default", "classify_x_to_y", "regress_x_to_y"} <= set(signatures.signature_def)
  predict = signatures.signature_def["serving_default"]
  assert predict.method_name == "tensorflow/serving/predict"
  assert predict.inputs["x"].dtype == tf.float32.as_datatype_enum
  del request.metadata_field[:]
  code, _ = _error(server.predict.GetModelMetadata, request)
  assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_get_model_status(server):
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = TF1_MODEL
  response = server.model.GetModelStatus(request, timeout=30)
  (status,) = response.model_version_status
  assert (status.version, status.state) == (TF1_VERSION, State.AVAILABLE)
  assert status.status.error_code == 0
  request.model_spec.name = TF2_MODEL
  versions = server.model.GetModelStatus(request, timeout=30)
  assert [(s.version, s.state) for s in versions.model_version_status] == [
    (2, State.AVAILABLE),
    (1, State.AVAILABLE),
  ]  # Newest first.
  request.model_spec.name = "missing"
  code, details = _error(server.model.GetModelStatus, request)
  assert code == grpc.StatusCode.NOT_FOUND
  assert "Could not find any versions of model missing" in details


def test_health(server):
  stub = health_pb2_grpc.HealthStub(server.channel)
  response = stub.Check(health_pb2.HealthCheckRequest(service="tensorflow.serving.PredictionService"), timeout=60)
  assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_survives_garbage(server):
  """Raw bytes that are not a PredictRequest must not hurt the server."""
  call = server.channel.unary_unary(
    "/tensorflow.serving.PredictionService/Predict", request_serializer=lambda b: b, response_deserializer=lambda b: b
  )
  with pytest.raises(grpc.RpcError):
    call(b"\xff\xff\xff\x00garbage", timeout=60)
  response = server.predict.Predict(_predict_request(), timeout=30)
  assert np.isclose(response.outputs["y"].float_val[0], 3.0)
