"""A REST Predict holds one servable from its signature lookup to its run, as a gRPC Predict does."""

import contextlib
import json

import pytest
import serving_testlib as lib
import tensorflow as tf

from serving.model_servers import http_server, service_impl
from serving.monitoring import metrics as metrics_lib
from serving.servables import saved_model_bundle

MODEL = "m"


class _Int64Model(tf.Module):
  @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="x")])
  def serve(self, x):
    return {"y": x * 10}


class _SwappingCore:
  """Hands `first` to the first handle taken and `then` to every later one: a version swap right after
  the first lookup. Counts the handles taken."""

  def __init__(self, first, then):
    self._first, self._then = first, then
    self.handles = 0

  @contextlib.contextmanager
  def servable_handle(self, model_spec):
    del model_spec
    self.handles += 1
    yield self._first if self.handles == 1 else self._then

  def has_model(self, name):
    return name == MODEL


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
  """Version 1 takes float x (half plus two); version 2 takes int64 x."""
  root = tmp_path_factory.mktemp("swap")
  lib.write_tf2_half_plus_two(str(root / "1"))
  tf.saved_model.save(_Int64Model(), str(root / "2"), signatures={"serving_default": _Int64Model().serve})
  bundles = [saved_model_bundle.SavedModelBundle(MODEL, v, str(root / str(v))) for v in (1, 2)]
  yield bundles
  for bundle in bundles:
    bundle.close()


def _rest(first, then):
  core = _SwappingCore(first, then)
  metrics = metrics_lib.Metrics()
  return core, metrics, http_server.RestApi(service_impl.ServingApi(core, metrics), 30000)


def _count(metrics, status):
  return (
    metrics.registry.get_sample_value(
      ":tensorflow:serving:request_count_total", {"model_name": MODEL, "status": status}
    )
    or 0
  )


def test_predict_runs_on_the_version_whose_signature_parsed_it(versions):
  core, _, rest = _rest(*versions)
  status, body = rest.handle("POST", f"/v1/models/{MODEL}:predict", json.dumps({"instances": [1.0, 2.0]}).encode())
  # Two handles would read version 1's float signature and run version 2, which wants int64.
  assert (status, body) == (200, {"predictions": [2.5, 3.0]})
  assert core.handles == 1


def test_predict_is_admitted_and_counted_once(versions):
  core, metrics, rest = _rest(versions[0], versions[0])
  status, _ = rest.handle("POST", f"/v1/models/{MODEL}:predict", json.dumps({"instances": [1.0]}).encode())
  assert status == 200
  status, body = rest.handle(
    "POST", f"/v1/models/{MODEL}:predict", json.dumps({"signature_name": "nope", "instances": [1.0]}).encode()
  )
  assert status == 400 and "nope" in body["error"]
  # A signature looked up outside ServingApi's admission and metrics went uncounted.
  assert (_count(metrics, "OK"), _count(metrics, "INVALID_ARGUMENT")) == (1, 1)
  assert core.handles == 2


def test_metadata_takes_one_handle(versions):
  core, _, rest = _rest(*versions)
  status, body = rest.handle("GET", f"/v1/models/{MODEL}/metadata", b"")
  assert status == 200 and body["model_spec"]["version"] == "1"
  assert core.handles == 1
