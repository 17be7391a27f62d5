"""A version whose saved_model.pb doesn't parse fails with TF Serving's DATA_LOSS on both paths."""

import grpc
import pytest
import serving_testlib as lib
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2
from tensorflow_serving.config import model_server_config_pb2


@pytest.mark.usefixtures("native")
def test_a_corrupt_saved_model_pb_is_data_loss(tmp_path):
  """The Python path answered INTERNAL "OSError: Cannot parse file b'...'": TF's Python reader's
  exception, where TF Serving and the native data plane answer DATA_LOSS "Can't parse ... as
  binary proto". A truncated copy of a version is the usual cause; both paths now say so alike."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  lib.write_broken(str(tmp_path / "g" / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"))
  try:
    config = model_server_config_pb2.ModelServerConfig()
    for name in ("m", "g"):
      config.model_config_list.config.add(name=name, base_path=str(tmp_path / name), model_platform="tensorflow")
    request = model_management_pb2.ReloadConfigRequest(config=config)
    code, details = lib.grpc_code(server.model.HandleReloadConfigRequest, request)
    assert code == grpc.StatusCode.DATA_LOSS
    assert f"Can't parse {tmp_path / 'g' / '1' / 'saved_model.pb'} as binary proto" in details
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "g"
    (version,) = server.model.GetModelStatus(status, timeout=30).model_version_status
    assert version.status.error_code == grpc.StatusCode.DATA_LOSS.value[0]
  finally:
    server.stop()
