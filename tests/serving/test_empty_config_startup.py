"""A --model_config_file holding an empty config starts a server with no model, as TF Serving."""

import grpc
import pytest
import serving_testlib as lib
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import errors
from serving.model_servers import server as server_lib


def _status(server, name: str) -> grpc.StatusCode:
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = name
  return lib.grpc_code(server.model.GetModelStatus, request)[0]


@pytest.mark.usefixtures("native")
def test_a_config_with_only_comments_starts_with_no_model(tmp_path):
  """It was refused ("ModelServerConfig is empty"), so a server meant to get its models from a
  later ReloadConfig (e.g. from a model-management sidecar) couldn't start. TF Serving takes no
  action for an empty config, and accepts any model_config_list after it."""
  config = tmp_path / "models.config"
  config.write_text("# Models come by HandleReloadConfigRequest.\n")
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(model_config_file=str(config))
  try:
    assert _status(server, "m") == grpc.StatusCode.NOT_FOUND
    reload = model_server_config_pb2.ModelServerConfig()
    reload.model_config_list.config.add(name="m", base_path=str(tmp_path / "m"), model_platform="tensorflow")
    request = model_management_pb2.ReloadConfigRequest(config=reload)
    assert server.model.HandleReloadConfigRequest(request, timeout=60).status.error_code == 0
    assert _status(server, "m") == grpc.StatusCode.OK
  finally:
    server.stop()


def test_a_zero_byte_config_file_is_refused(tmp_path):
  """As TF Serving (which can't read an empty file): most likely a file caught mid-write."""
  config = tmp_path / "models.config"
  config.write_text("")
  server = server_lib.Server(server_lib.Options(port=0, model_config_file=str(config), native="off"))
  try:
    with pytest.raises(errors.ServingError) as info:
      server.start()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "is empty (0 bytes)" in info.value.message
  finally:
    server.stop(grace_seconds=0)
