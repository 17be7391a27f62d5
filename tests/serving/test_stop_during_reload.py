"""A graceful stop doesn't wait for a reload that is waiting out a new model's load retries."""

import collections
import os
import shutil
import threading

import grpc
import pytest
import serving_testlib as lib
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from serving.core import loader

_MINUTE_MICROS = 60 * 10**6


@pytest.mark.usefixtures("native")
def test_stop_ends_a_reload_waiting_for_load_retries(tmp_path, monkeypatch):
  """A reload adds model "q", whose only version fails to load and is retried a minute later; the
  reload waits for it (as TF Serving's does for a new model). The server then stops: its front
  end waited for the reload's call, and the reload for the retry, so the stop took until the
  retry had run (minutes with TF Serving's default retry flags; SIGKILL comes first under a 30 s
  termination grace). Now the reload answers UNAVAILABLE at once and no retry runs."""
  attempts = collections.Counter()
  real = loader.load_once

  def counting(name, version, *args, **kwargs):
    attempts[name] += 1
    return real(name, version, *args, **kwargs)

  monkeypatch.setattr(loader, "load_once", counting)
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  os.makedirs(tmp_path / "q" / "1")
  shutil.copy(tmp_path / "m" / "1" / "saved_model.pb", tmp_path / "q" / "1")  # No variables: fails.
  server = lib.InProcessServer(
    model_name="m", model_base_path=str(tmp_path / "m"), load_retry_interval_micros=_MINUTE_MICROS
  )
  monkeypatch.setattr(server.server.core._loader_options, "max_num_load_retries", 1)
  config = model_server_config_pb2.ModelServerConfig()
  for name in ("m", "q"):
    config.model_config_list.config.add(name=name, base_path=str(tmp_path / name), model_platform="tensorflow")
  answers = []
  request = model_management_pb2.ReloadConfigRequest(config=config)
  # Its own channel: InProcessServer.stop closes the server's first (its calls end CANCELLED).
  channel = grpc.insecure_channel(f"127.0.0.1:{server.server.grpc_port}")
  stub = model_service_pb2_grpc.ModelServiceStub(channel)
  reload = threading.Thread(target=lambda: answers.append(lib.grpc_code(stub.HandleReloadConfigRequest, request)))
  reload.start()
  try:
    lib.wait_for(lambda: attempts["q"] == 1)
  finally:
    server.stop()
    reload.join()
    channel.close()
  code, details = answers[0]
  assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
  assert attempts["q"] == 1  # The retry never ran.
