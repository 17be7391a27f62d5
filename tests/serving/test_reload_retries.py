"""A config reload doesn't wait out the load retries of a served model's broken new version."""

import os

import grpc
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2, predict_pb2
from tensorflow_serving.config import model_server_config_pb2

State = get_model_status_pb2.ModelVersionStatus.State
_MINUTE_MICROS = 60 * 10**6  # Beyond the reload deadline below: a reload waiting for the retry fails.


def _reload(server, base: str, labels=None) -> grpc.StatusCode:
  config = model_server_config_pb2.ModelServerConfig()
  model = config.model_config_list.config.add(name="m", base_path=base, model_platform="tensorflow")
  for label, version in (labels or {}).items():
    model.version_labels[label] = version
  request = model_management_pb2.ReloadConfigRequest(config=config)
  code, _ = lib.grpc_code(server.model.HandleReloadConfigRequest, request, timeout=30)
  return code


def test_a_reload_answers_while_a_broken_new_version_waits_to_retry(tmp_path):
  """Version 2 on disk fails to load and is retried a minute later. A reload of the served model
  (even an unchanged config, or one adding another model) waited for every retry, holding the
  reload lock meanwhile: minutes with TF Serving's default --max_num_load_retries=5 and 60 s
  interval, past any client deadline. TF Serving's ReloadConfig doesn't wait for models already
  configured; fgr-serve waits until each new version served or failed once."""
  base = str(tmp_path / "m")
  lib.write_tf2_half_plus_two(os.path.join(base, "1"))
  server = lib.InProcessServer(
    model_name="m",
    model_base_path=base,
    file_system_poll_wait_seconds=0,
    max_num_load_retries=1,
    load_retry_interval_micros=_MINUTE_MICROS,
  )
  try:
    lib.write_broken(os.path.join(base, "2"))
    assert _reload(server, base) == grpc.StatusCode.OK
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "m"
    states = {s.version: s.state for s in server.model.GetModelStatus(request, timeout=30).model_version_status}
    assert states == {2: State.LOADING, 1: State.AVAILABLE}
    predict = predict_pb2.PredictRequest()
    predict.model_spec.name = "m"
    predict.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0], dtype=tf.float32))
    assert server.predict.Predict(predict, timeout=30).model_spec.version.value == 1
    # A label on the retrying version is refused now, not after the retries.
    assert _reload(server, base, {"canary": 2}) == grpc.StatusCode.FAILED_PRECONDITION
  finally:
    server.stop()
