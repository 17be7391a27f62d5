"""GetModelStatus for a model removed from the config: its versions stay visible, as in TF Serving."""

import os
import shutil

import grpc
import pytest
import serving_testlib as lib
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.core import server_core

State = get_model_status_pb2.ModelVersionStatus.State


def _config(base: str, *names: str) -> model_server_config_pb2.ModelServerConfig:
  """Models `names`, each serving <base>/<name>."""
  config = model_server_config_pb2.ModelServerConfig()
  config.model_config_list.SetInParent()
  for name in names:
    config.model_config_list.config.add(name=name, base_path=os.path.join(base, name), model_platform="tensorflow")
  return config


def _status(server, name: str, version: int | None = None) -> dict[int, int] | grpc.StatusCode:
  """{version: state} of GetModelStatus, or its error code."""
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = name
  if version is not None:
    request.model_spec.version.value = version
  try:
    response = server.model.GetModelStatus(request, timeout=30)
  except grpc.RpcError as e:
    return e.code()
  return {s.version: s.state for s in response.model_version_status}


@pytest.mark.usefixtures("native")
def test_a_removed_model_reports_its_versions_ending(tmp_path, monkeypatch):
  """Removing a model from the config made GetModelStatus answer NOT_FOUND at once, while its
  versions were still unloading (in-flight requests draining) and after: a client couldn't tell a
  removed model from a name never configured, nor wait for its unload. TF Serving reports them
  UNLOADING, then END. The last REMOVED_MODELS_KEPT removed models are remembered."""
  monkeypatch.setattr(server_core, "REMOVED_MODELS_KEPT", 1)
  lib.write_tf2_half_plus_two(str(tmp_path / "a" / "1"))
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  server = lib.InProcessServer(model_name="a", model_base_path=str(tmp_path / "a"))

  def reload(*names):
    request = model_management_pb2.ReloadConfigRequest(config=_config(str(tmp_path), *names))
    return server.model.HandleReloadConfigRequest(request, timeout=60).status.error_code

  try:
    assert reload("a", "b") == 0
    assert _status(server, "a") == _status(server, "b") == {1: State.AVAILABLE}
    assert reload("b") == 0
    lib.wait_for(lambda: _status(server, "a") == {1: State.END})
    assert _status(server, "a", 1) == {1: State.END}
    assert _status(server, "a", 2) == grpc.StatusCode.NOT_FOUND
    assert reload() == 0  # Removes b too: only the last removed model is kept here.
    lib.wait_for(lambda: _status(server, "b") == {1: State.END})
    assert _status(server, "a") == grpc.StatusCode.NOT_FOUND
    assert _status(server, "never", 1) == grpc.StatusCode.NOT_FOUND
    assert reload("b") == 0  # Added back: its new versions only.
    assert _status(server, "b") == {1: State.AVAILABLE}
  finally:
    server.stop()
