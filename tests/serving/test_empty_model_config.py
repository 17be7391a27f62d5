"""An empty ModelServerConfig (a config file caught truncated mid-write) is named as such."""

import pytest
from tensorflow_serving.config import model_server_config_pb2

from serving import errors
from serving.core import loader, server_core


def test_an_empty_config_is_refused_as_empty():
  """It was refused with "custom_model_config is not supported", which the file never mentioned."""
  core = server_core.ServerCore(loader.LoaderOptions())
  try:
    # An empty first config is taken as no model yet, as TF Serving (test_empty_config_startup.py).
    core.reload_config(model_server_config_pb2.ModelServerConfig(model_config_list={}))
    with pytest.raises(errors.ServingError) as info:
      core.reload_config(model_server_config_pb2.ModelServerConfig())
    assert info.value.code.name == "FAILED_PRECONDITION"  # As TF Serving.
    assert "ModelServerConfig is empty" in info.value.message
  finally:
    core.stop()
