"""Fixtures: test SavedModels, one fgr-serve subprocess per --native mode, and `native`."""

import pytest
import serving_testlib as lib


@pytest.fixture
def native(native_mode, monkeypatch) -> str:
  """Runs the servers a test starts through serving_testlib (InProcessServer, ServerProcess) with
  --native=<mode>: the test then runs once on the Python front end, once on the native one."""
  monkeypatch.setattr(lib, "NATIVE", native_mode)
  return native_mode


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
  """half_plus_two as TF1 (v123, warm-up), TF2 (v1, v2), Keras; a ScaNN model."""
  root = tmp_path_factory.mktemp("models")
  tf1_dir = str(root / lib.TF1_MODEL / str(lib.TF1_VERSION))
  lib.write_tf1_half_plus_two(tf1_dir)
  lib.write_warmup(tf1_dir, lib.TF1_MODEL)
  lib.write_tf2_half_plus_two(str(root / lib.TF2_MODEL / "1"))
  lib.write_tf2_half_plus_two(str(root / lib.TF2_MODEL / "2"), b=3.0)
  lib.write_keras_half_plus_two(str(root / lib.KERAS_MODEL / "1"))
  lib.write_scann_model(str(root / lib.SCANN_MODEL / "1"), lib.SCANN_DATABASE)
  return root


@pytest.fixture(scope="session")
def _servers(model_root, tmp_path_factory):
  """Starts the session's fgr-serve for a --native mode on first use, and keeps it to the session's end.

  `server` is parametrized by the session-scoped `native_mode`, so pytest tears it down whenever the
  mode changes between test files; kept here instead, each mode's server starts once per worker, not
  once per run of same-mode tests. Tearing them down checks the graceful SIGTERM path exits 0.
  """
  started: dict[str, lib.ServerProcess] = {}

  def get(native_mode: str) -> lib.ServerProcess:
    if native_mode not in started:
      started[native_mode] = _start_server(model_root, tmp_path_factory.mktemp(f"server_{native_mode}"), native_mode)
    return started[native_mode]

  yield get
  ends = {}
  for mode, proc in started.items():  # Each is stopped even when another's stop fails.
    try:
      ends[mode] = proc.terminate()
    except AssertionError as e:
      ends[mode] = e
  for mode, end in ends.items():
    assert end == 0, f"--native={mode}: {end if isinstance(end, AssertionError) else started[mode].stderr()[-3000:]}"


@pytest.fixture(scope="session")
def server(_servers, native_mode):
  """One fgr-serve per --native mode serving every model, REST and Prometheus enabled (`_servers`)."""
  return _servers(native_mode)


def _start_server(model_root, tmp, native_mode: str) -> lib.ServerProcess:
  """An fgr-serve serving every model of `model_root`, with REST and Prometheus enabled."""
  config = tmp / "models.config"
  config.write_text(f"""
model_config_list {{
  config {{
    name: "{lib.TF1_MODEL}" base_path: "{model_root / lib.TF1_MODEL}"
    model_platform: "tensorflow"
  }}
  config {{
    name: "{lib.TF2_MODEL}" base_path: "{model_root / lib.TF2_MODEL}"
    model_platform: "tensorflow"
    model_version_policy {{ all {{}} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
  }}
  config {{
    name: "{lib.KERAS_MODEL}" base_path: "{model_root / lib.KERAS_MODEL}"
  }}
  config {{
    name: "{lib.SCANN_MODEL}" base_path: "{model_root / lib.SCANN_MODEL}"
  }}
}}
""")
  monitoring = tmp / "monitoring.config"
  monitoring.write_text('prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }')
  return lib.ServerProcess(
    [
      f"--model_config_file={config}",
      f"--rest_api_port={lib.REST_ANY_PORT}",
      f"--monitoring_config_file={monitoring}",
      "--enable_grpc_healthcheck_service",
    ],
    str(tmp),
    native=native_mode,
  )
