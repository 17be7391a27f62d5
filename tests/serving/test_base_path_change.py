"""A reload moving a model to another base_path keeps same-numbered loaded versions, as TF Serving."""

import logging

import numpy as np
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import model_management_pb2, predict_pb2
from tensorflow_serving.config import model_server_config_pb2


def _reload(server, base_path: str) -> int:
  config = model_server_config_pb2.ModelServerConfig()
  config.model_config_list.config.add(name="m", base_path=base_path, model_platform="tensorflow")
  request = model_management_pb2.ReloadConfigRequest(config=config)
  return server.model.HandleReloadConfigRequest(request, timeout=60).status.error_code


def _predict(server) -> float:
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "m"
  request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0], "f4")))
  return float(tf.make_ndarray(server.predict.Predict(request, timeout=30).outputs["y"]).ravel()[0])


@pytest.mark.usefixtures("native")
def test_a_new_base_path_keeps_a_same_numbered_version_and_says_so(tmp_path, caplog):
  """Version 1 keeps serving from the old path (TF Serving knows a version by its number); the
  change was silent: now a warning names the kept versions and how to serve the new copy.
  A new number under the new path loads from there."""
  lib.write_tf2_half_plus_two(str(tmp_path / "a" / "1"))
  lib.write_tf2_half_plus_two(str(tmp_path / "b" / "1"), b=7.0)
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "a"), file_system_poll_wait_seconds=0)
  try:
    with caplog.at_level(logging.WARNING):
      assert _reload(server, str(tmp_path / "b")) == 0
    assert _predict(server) == 2.5
    assert "versions [1] loaded from the old path keep serving" in caplog.text
    lib.write_tf2_half_plus_two(str(tmp_path / "b" / "2"), b=9.0)
    assert _reload(server, str(tmp_path / "b")) == 0  # Same config: polls the new path.
    lib.wait_for(lambda: _predict(server) == 9.5)
  finally:
    server.stop()
