"""--monitoring_config_file: a Prometheus path no request can reach is refused at start-up."""

import pytest

from serving import errors
from serving.model_servers import server as server_lib


def test_a_prometheus_path_without_a_leading_slash_is_refused(tmp_path):
  """`path: "metrics"` started the server, but no request path ever equals it: the metrics were
  never served, with nothing said (TF Serving likewise)."""
  config = tmp_path / "monitoring.config"
  config.write_text('prometheus_config { enable: true, path: "metrics" }')
  models = tmp_path / "models.config"
  models.write_text("model_config_list {}")  # No model: a start-up that isn't refused returns at once.
  options = server_lib.Options(
    port=0,
    rest_api_port=server_lib.REST_API_ANY_PORT,
    monitoring_config_file=str(config),
    model_config_file=str(models),
    native="off",
  )
  server = server_lib.Server(options)
  try:
    with pytest.raises(errors.ServingError) as info:
      server.start()
  finally:
    server.stop(grace_seconds=0)
  assert info.value.code.name == "INVALID_ARGUMENT"
  assert "prometheus_config.path must start with '/'" in info.value.message
