"""A `specific` version policy naming versions not on disk keeps what serves, and says what is missing."""

import logging

import grpc
import numpy as np
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2, predict_pb2
from tensorflow_serving.config import model_server_config_pb2

State = get_model_status_pb2.ModelVersionStatus.State


def _reload(server, base_path: str, versions=None) -> int:
  """HandleReloadConfigRequest serving model "m" from `base_path`: `specific` `versions`, or latest."""
  config = model_server_config_pb2.ModelServerConfig()
  model = config.model_config_list.config.add(name="m", base_path=base_path, model_platform="tensorflow")
  if versions is not None:
    model.model_version_policy.specific.versions.extend(versions)
  request = model_management_pb2.ReloadConfigRequest(config=config)
  return server.model.HandleReloadConfigRequest(request, timeout=60).status.error_code


def _states(server) -> dict[int, int]:
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = "m"
  return {s.version: s.state for s in server.model.GetModelStatus(request, timeout=30).model_version_status}


def _predict(server) -> float | grpc.StatusCode:
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "m"
  request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0], "f4")))
  try:
    response = server.predict.Predict(request, timeout=30)
  except grpc.RpcError as e:
    return e.code()
  return float(tf.make_ndarray(response.outputs["y"]).ravel()[0])


@pytest.mark.usefixtures("native")
def test_a_specific_version_not_on_disk_keeps_the_served_one(tmp_path, caplog):
  """Switching to `specific { versions: 7 }` before version 7 was published unloaded version 1
  (as TF Serving, whose source then aspires nothing): the model answered NOT_FOUND until 7 came,
  with nothing logged. Now version 1 serves on, TF Serving's warnings name the missing version,
  and version 7 swaps in once it is there."""
  base = tmp_path / "m"
  lib.write_tf2_half_plus_two(str(base / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(base), file_system_poll_wait_seconds=0)
  try:
    with caplog.at_level(logging.WARNING):
      assert _reload(server, str(base), [7]) == 0
    assert _states(server) == {1: State.AVAILABLE}
    assert _predict(server) == 2.5
    assert "Version 7 of servable m, which was requested to be served as a 'specific' version" in caplog.text
    assert "No versions of servable m found under base path" in caplog.text

    lib.write_tf2_half_plus_two(str(base / "7"), b=3.0)
    assert _reload(server, str(base), [7]) == 0  # A reload polls the base path.
    lib.wait_for(lambda: _states(server) == {1: State.END, 7: State.AVAILABLE})
    assert _predict(server) == 3.5
  finally:
    server.stop()


@pytest.mark.usefixtures("native")
def test_specific_versions_partly_on_disk_serve_those_found(tmp_path, caplog):
  """As TF Serving: the versions found serve, the others are named in a warning."""
  base = tmp_path / "m"
  lib.write_tf2_half_plus_two(str(base / "1"))
  lib.write_tf2_half_plus_two(str(base / "2"), b=3.0)
  server = lib.InProcessServer(model_name="m", model_base_path=str(base), file_system_poll_wait_seconds=0)
  try:
    with caplog.at_level(logging.WARNING):
      assert _reload(server, str(base), [1, 9]) == 0
    lib.wait_for(lambda: _states(server) == {1: State.AVAILABLE, 2: State.END})
    assert "Version 9 of servable m" in caplog.text
    assert "Version 1 of servable m" not in caplog.text
  finally:
    server.stop()
