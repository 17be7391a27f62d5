"""--ssl_config_file is checked before any model loads, with a message that says what is wrong."""

import pytest
import serving_testlib as lib

from serving import errors
from serving.config import protos
from serving.model_servers import grpc_server


@pytest.fixture(scope="module")
def pems(tmp_path_factory) -> dict[str, str]:
  """PEM text of two self-signed certificates and their keys."""
  directory = tmp_path_factory.mktemp("pems")
  texts = {}
  for name in ("localhost", "other"):
    key, cert = lib.self_signed_cert(str(directory), (name,))
    texts[f"{name}_key"], texts[f"{name}_cert"] = open(key).read(), open(cert).read()
    texts[f"{name}_key_path"] = key
  return texts


def _refusal(**fields) -> str:
  with pytest.raises(errors.ServingError) as info:
    grpc_server.check_ssl_config(protos.SSLConfig(**fields))
  assert info.value.code.name == "INVALID_ARGUMENT"
  return info.value.message


def test_unusable_pem_text_is_refused_before_serving(pems):
  """File names in place of PEM text (TF Serving's SSLConfig holds the contents), garbage, or a
  key that isn't the certificate's passed the check; gRPC then failed to bind the port, after
  every model had loaded, with "Failed to bind gRPC server to 127.0.0.1:0"."""
  good = {"server_key": pems["localhost_key"], "server_cert": pems["localhost_cert"]}
  grpc_server.check_ssl_config(protos.SSLConfig(**good))
  grpc_server.check_ssl_config(protos.SSLConfig(**good, custom_ca=pems["other_cert"], client_verify=True))

  message = _refusal(server_key=pems["localhost_key_path"], server_cert=pems["localhost_cert"])
  assert "server_key must hold PEM text" in message and pems["localhost_key_path"] in message
  garbage = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
  assert "server_key and server_cert aren't" in _refusal(server_key=garbage, server_cert=pems["localhost_cert"])
  assert "server_key and server_cert aren't" in _refusal(
    server_key=pems["other_key"], server_cert=pems["localhost_cert"]
  )
  garbage_ca = "-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n"
  assert "custom_ca" in _refusal(**good, custom_ca=garbage_ca)
