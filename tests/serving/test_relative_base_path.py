"""A relative base_path in a ModelServerConfig is refused, as TF Serving's ValidateModelConfigList."""

import os

import grpc
import pytest
import serving_testlib as lib
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import errors
from serving.model_servers import server as server_lib

_EXPECTED = "Expected model m to have an absolute path or URI; got base_path()=m"


@pytest.mark.usefixtures("native")
def test_a_reload_with_a_relative_base_path_is_refused(tmp_path, monkeypatch):
  """It was resolved against the server's working directory, which a client sending the reload
  can't know: the model then silently served whatever was there, or nothing."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"))
  try:
    monkeypatch.chdir(tmp_path)  # Where "m" would have resolved.
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.add(name="m", base_path="m", model_platform="tensorflow")
    request = model_management_pb2.ReloadConfigRequest(config=config)
    code, details = lib.grpc_code(server.model.HandleReloadConfigRequest, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == _EXPECTED
    assert server.server.core.config.model_config_list.config[0].base_path == str(tmp_path / "m")
  finally:
    server.stop()


def test_a_config_file_with_a_relative_base_path_is_refused_at_start(tmp_path, monkeypatch):
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))  # It served from the working directory.
  monkeypatch.chdir(tmp_path)
  config = tmp_path / "models.config"
  config.write_text('model_config_list { config { name: "m" base_path: "m" model_platform: "tensorflow" } }')
  server = server_lib.Server(server_lib.Options(port=0, model_config_file=str(config), native="off"))
  try:
    with pytest.raises(errors.ServingError) as info:
      server.start()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == _EXPECTED
  finally:
    server.stop(grace_seconds=0)


def test_a_relative_model_base_path_flag_is_resolved_against_the_working_directory(tmp_path, monkeypatch):
  """Ours (TF Serving refuses it): a path typed on the command line means what the shell means."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  monkeypatch.chdir(tmp_path)
  server = lib.InProcessServer(model_name="m", model_base_path="m", native="off")
  try:
    assert server.server.core.config.model_config_list.config[0].base_path == os.path.join(str(tmp_path), "m")
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "m"
    assert server.model.GetModelStatus(request, timeout=30).model_version_status[0].version == 1
  finally:
    server.stop()
