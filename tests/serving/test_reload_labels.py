"""Version labels across config reloads: a refused reload changes nothing, a label moves only to a
version that serves, and a config file whose label waits for its version applies once it serves."""

import logging
import os
import shutil

import grpc
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2, predict_pb2
from tensorflow_serving.config import model_server_config_pb2

State = get_model_status_pb2.ModelVersionStatus.State


def _config(base: str, versions=(), labels=None) -> model_server_config_pb2.ModelServerConfig:
  """Model "m" at `base`: `specific` versions (none: latest), with `labels`."""
  config = model_server_config_pb2.ModelServerConfig()
  model = config.model_config_list.config.add(name="m", base_path=base, model_platform="tensorflow")
  if versions:
    model.model_version_policy.specific.versions.extend(versions)
  for label, version in (labels or {}).items():
    model.version_labels[label] = version
  return config


def _version(server, **spec) -> int | grpc.StatusCode:
  """The version a Predict on "m" with `spec` (version= or version_label=) ran on, or its error code."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "m"
  if "version" in spec:
    request.model_spec.version.value = spec["version"]
  if "version_label" in spec:
    request.model_spec.version_label = spec["version_label"]
  request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0], dtype=tf.float32))
  try:
    return server.predict.Predict(request, timeout=30).model_spec.version.value
  except grpc.RpcError as e:
    return e.code()


def _reload(server, config) -> grpc.StatusCode:
  request = model_management_pb2.ReloadConfigRequest(config=config)
  code, _ = lib.grpc_code(server.model.HandleReloadConfigRequest, request)
  return code


def _states(server) -> dict[int, int]:
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = "m"
  return {s.version: s.state for s in server.model.GetModelStatus(request, timeout=30).model_version_status}


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> str:
  """Versions 1, 2 and 3 (y = x/2 + version), written once."""
  path = tmp_path_factory.mktemp("versions")
  for version in (1, 2, 3):
    lib.write_tf2_half_plus_two(str(path / str(version)), b=float(version))
  return str(path)


@pytest.fixture
def base(versions, tmp_path) -> str:
  """Model "m" with versions 1 and 2."""
  path = tmp_path / "m"
  for version in ("1", "2"):
    shutil.copytree(os.path.join(versions, version), path / version)
  return str(path)


@pytest.mark.usefixtures("native")
def test_a_reload_refused_for_its_labels_changes_nothing(base):
  """The labels were checked only after the new versions loaded and the old ones began to unload:
  the reload answered FAILED_PRECONDITION with `stable`'s version already gone, so every request
  on `stable` failed NOT_FOUND. Now a label that can't end up on a served version refuses the
  reload before anything changes."""
  server = lib.InProcessServer(model_name="m", model_base_path=base)
  try:
    assert _reload(server, _config(base, [1], {"stable": 1})) == grpc.StatusCode.OK
    # A label on a version not on disk; one the new policy would unload.
    for refused in (_config(base, [2], {"stable": 9}), _config(base, [2], {"stable": 1})):
      assert _reload(server, refused) == grpc.StatusCode.FAILED_PRECONDITION
      assert _states(server)[1] == State.AVAILABLE
      assert _version(server, version_label="stable") == 1
    assert _version(server, version=2) == grpc.StatusCode.NOT_FOUND  # Never loaded.
    # A label on a version the same reload loads is fine.
    assert _reload(server, _config(base, [1, 2], {"stable": 1, "canary": 2})) == grpc.StatusCode.OK
    assert _version(server, version_label="canary") == 2
  finally:
    server.stop()


def test_allowed_unavailable_labels_do_not_move_a_label_to_an_unavailable_version(base):
  """--allow_version_labels_for_unavailable_models lets a new label name a version that isn't
  served, but, as in TF Serving, not an existing one be moved there: its clients would lose their
  answers. It moved."""
  server = lib.InProcessServer(model_name="m", model_base_path=base, allow_version_labels_for_unavailable_models=True)
  try:
    assert _reload(server, _config(base, [1], {"stable": 1})) == grpc.StatusCode.OK
    assert _reload(server, _config(base, [1], {"stable": 1, "next": 9})) == grpc.StatusCode.OK
    assert _version(server, version_label="next") == grpc.StatusCode.NOT_FOUND
    assert _reload(server, _config(base, [1], {"stable": 9, "next": 9})) == grpc.StatusCode.FAILED_PRECONDITION
    assert _version(server, version_label="stable") == 1
    # Moved to a version the reload loads: fine.
    assert _reload(server, _config(base, [1, 2], {"stable": 2})) == grpc.StatusCode.OK
    assert _version(server, version_label="stable") == 2
  finally:
    server.stop()


def test_a_config_file_label_applies_once_its_version_serves(versions, base, tmp_path, caplog):
  """The config file names a label on version 3 before version 3 is published. Its reload failed,
  and as the file then equalled the config in force it was never reloaded again: the label never
  applied. TF Serving reloads the file at every poll; fgr-serve does after a failed reload."""
  caplog.set_level(logging.INFO, logger="absl")
  config_file = tmp_path / "models.config"
  config_file.write_text(str(_config(base, [], {})))
  server = lib.InProcessServer(
    model_config_file=str(config_file),
    model_config_file_poll_wait_seconds=0.2,
    file_system_poll_wait_seconds=0.2,
  )
  try:
    config_file.write_text(str(_config(base, [], {"canary": 3})))
    lib.wait_for(lambda: any("version 3 of model m" in r.getMessage() for r in caplog.records))
    shutil.copytree(os.path.join(versions, "3"), str(tmp_path / "staging"))
    os.rename(str(tmp_path / "staging"), os.path.join(base, "3"))
    lib.wait_for(lambda: _version(server, version_label="canary") == 3)
  finally:
    server.stop()
