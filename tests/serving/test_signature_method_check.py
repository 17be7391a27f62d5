"""Classify/Regress on TF2-native signatures (method_name predict), with and
without TF Serving's --enable_signature_method_name_check."""

import json

import grpc
import pytest
import serving_testlib as lib
from tensorflow_serving.apis import classification_pb2, inference_pb2, regression_pb2

CLASSIFY = "classify_x_to_y"
REGRESS = "regress_x_to_y"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
XS = (1.0, 2.0)
YS = tuple(0.5 * x + 2.0 for x in XS)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
  root = tmp_path_factory.mktemp("tf2_examples")
  lib.write_tf2_classify_regress(str(root / "m" / "1"))
  return str(root / "m")


def _server(base_path, check: bool, native: str):
  return lib.InProcessServer(
    model_name="m",
    model_base_path=base_path,
    rest_api_port=lib.REST_ANY_PORT,
    enable_signature_method_name_check=check,
    native=native,
  )


@pytest.fixture(scope="module")
def unchecked(base_path, native_mode):
  server = _server(base_path, check=False, native=native_mode)  # TF Serving's default.
  yield server
  server.stop()


@pytest.fixture(scope="module")
def checked(base_path, native_mode):
  server = _server(base_path, check=True, native=native_mode)
  yield server
  server.stop()


def _fill(model_input, signature_name, model_spec):
  model_spec.name = "m"
  model_spec.signature_name = signature_name
  for x in XS:
    model_input.example_list.examples.add().features.feature["x"].float_list.value.append(x)


def _classify():
  request = classification_pb2.ClassificationRequest()
  _fill(request.input, CLASSIFY, request.model_spec)
  return request


def _regress():
  request = regression_pb2.RegressionRequest()
  _fill(request.input, REGRESS, request.model_spec)
  return request


def _multi_inference(signature_name, method_name):
  request = inference_pb2.MultiInferenceRequest()
  task = request.tasks.add(method_name=method_name)
  _fill(request.input, signature_name, task.model_spec)
  return request


def _rest(server, verb, signature_name):
  body = json.dumps({"signature_name": signature_name, "examples": [{"x": x} for x in XS]}).encode()
  return lib.post_json(server.server.rest_port, f"/v1/models/m:{verb}", body)


def _check_classes(result):
  assert len(result.classifications) == len(XS)
  for classification, y in zip(result.classifications, YS):
    assert [c.label for c in classification.classes] == ["y", "minus_y"]
    assert [c.score for c in classification.classes] == pytest.approx([y, -y])


def test_tf2_signatures_declare_predict(unchecked):
  with unchecked.server.core.servable_handle(_classify().model_spec) as bundle:
    methods = {name: bundle.signature_defs[name].method_name for name in (CLASSIFY, REGRESS)}
  assert methods == {CLASSIFY: "tensorflow/serving/predict", REGRESS: "tensorflow/serving/predict"}


def test_classify_without_the_check(unchecked):
  response = unchecked.predict.Classify(_classify(), timeout=60)
  _check_classes(response.result)
  assert response.model_spec.signature_name == CLASSIFY
  assert response.model_spec.version.value == 1


def test_regress_without_the_check(unchecked):
  response = unchecked.predict.Regress(_regress(), timeout=60)
  assert [r.value for r in response.result.regressions] == pytest.approx(YS)


def test_multi_inference_without_the_check(unchecked):
  response = unchecked.predict.MultiInference(_multi_inference(CLASSIFY, CLASSIFY_METHOD), timeout=60)
  (result,) = response.results
  _check_classes(result.classification_result)
  response = unchecked.predict.MultiInference(_multi_inference(REGRESS, REGRESS_METHOD), timeout=60)
  (result,) = response.results
  assert [r.value for r in result.regression_result.regressions] == (pytest.approx(YS))


def test_rest_without_the_check(unchecked):
  status, body = _rest(unchecked, "classify", CLASSIFY)
  assert status == 200, body
  for row, y in zip(body["results"], YS):
    assert [label for label, _ in row] == ["y", "minus_y"]
    assert [score for _, score in row] == pytest.approx([y, -y])
  status, body = _rest(unchecked, "regress", REGRESS)
  assert status == 200, body
  assert body["results"] == pytest.approx(YS)


def test_shape_still_checked_without_the_check(unchecked):
  """Off, the method is not checked, but inputs and outputs still are."""
  request = _classify()
  request.model_spec.signature_name = REGRESS  # No classes or scores.
  with pytest.raises(grpc.RpcError) as info:
    unchecked.predict.Classify(request, timeout=60)
  assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert 'at least one of "classes" or "scores"' in info.value.details()
  request = _regress()
  request.model_spec.signature_name = CLASSIFY  # Two outputs.
  with pytest.raises(grpc.RpcError) as info:
    unchecked.predict.Regress(request, timeout=60)
  assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert "Expected one output Tensor." in info.value.details()


@pytest.mark.parametrize(
  "rpc, request_fn, kind, method",
  [
    ("Classify", _classify, "classification", CLASSIFY_METHOD),
    ("Regress", _regress, "regression", REGRESS_METHOD),
    ("MultiInference", lambda: _multi_inference(CLASSIFY, CLASSIFY_METHOD), "classification", CLASSIFY_METHOD),
    ("MultiInference", lambda: _multi_inference(REGRESS, REGRESS_METHOD), "regression", REGRESS_METHOD),
  ],
)
def test_the_check_refuses_predict_signatures(checked, rpc, request_fn, kind, method):
  with pytest.raises(grpc.RpcError) as info:
    getattr(checked.predict, rpc)(request_fn(), timeout=60)
  assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert (
    f"Expected {kind} signature method_name to be {method}. Was: tensorflow/serving/predict"
  ) in info.value.details()


@pytest.mark.parametrize(
  "verb, signature_name, kind", [("classify", CLASSIFY, "classification"), ("regress", REGRESS, "regression")]
)
def test_the_check_refuses_predict_signatures_over_rest(checked, verb, signature_name, kind):
  status, body = _rest(checked, verb, signature_name)
  assert status == 400
  assert f"Expected {kind} signature method_name" in body["error"]
