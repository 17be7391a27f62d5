"""The clients' gRPC channels: plaintext, or TLS to a server started with `--ssl_config_file`.

fgr-serve (like TF Serving) takes an SSLConfig: `server_key` and `server_cert`, and with `client_verify`
a `custom_ca` that client certificates must chain to. `Tls` is the client's side of it: the roots to
check the server's certificate against, a certificate and key to present for `client_verify`, and the
name to expect on the server's certificate. fgr-query and fgr-loadtest both open their channels here,
and take the same `--tls*` flags (`define_flags`, `tls_from_flags`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import grpc
from absl import flags


@dataclasses.dataclass(frozen=True)
class Tls:
  """How to reach a TLS server.

  Attributes:
    root_certs: PEM certificates the server's certificate must chain to: its own `server_cert` when it
      is self-signed, else the CA that signed it. None: gRPC's default roots.
    client_cert: PEM certificate chain to present to a server with `client_verify` (mutual TLS); it
      must chain to the server's `custom_ca`. None: no client certificate.
    client_key: PEM private key of `client_cert`.
    server_name: the name to check the server's certificate against when the address's host is not
      on it (an IP address, or a load balancer's name). None: the address's host.
  """

  root_certs: bytes | None = None
  client_cert: bytes | None = None
  client_key: bytes | None = None
  server_name: str | None = None

  def __post_init__(self):
    if (self.client_cert is None) != (self.client_key is None):
      raise ValueError("a client certificate and its private key go together: give both or neither")

  def credentials(self) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(self.root_certs, self.client_key, self.client_cert)

  def channel_options(self) -> list[tuple[str, Any]]:
    return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def channel(address: str, tls: Tls | None = None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
  """A channel to `address` (host:port): TLS with `tls`, else plaintext."""
  return _open(grpc, address, tls, options)


def aio_channel(address: str, tls: Tls | None = None, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
  """An asyncio channel to `address` (host:port): TLS with `tls`, else plaintext."""
  return _open(grpc.aio, address, tls, options)


def _open(api: ModuleType, address: str, tls: Tls | None, options: Sequence[tuple[str, Any]]) -> Any:
  """A channel from `api` (grpc or grpc.aio, which name their channel constructors alike)."""
  if tls is None:
    return api.insecure_channel(address, options=list(options))
  return api.secure_channel(address, tls.credentials(), options=list(options) + tls.channel_options())


def define_flags() -> None:
  """Defines the --tls* flags; each client calls it once, with its own flags."""
  flags.DEFINE_bool(
    "tls",
    False,
    "Connect with TLS (implied by any other --tls_* flag), to a server started with --ssl_config_file. "
    "Without --tls_root_certs its certificate is checked against gRPC's default roots.",
  )
  flags.DEFINE_string(
    "tls_root_certs",
    None,
    "PEM file of the certificates the server's must chain to: its SSLConfig server_cert when self-signed.",
  )
  flags.DEFINE_string(
    "tls_client_cert",
    None,
    "PEM file of the certificate chain to present to a server whose SSLConfig sets client_verify (it must "
    "chain to the server's custom_ca); needs --tls_client_key.",
  )
  flags.DEFINE_string("tls_client_key", None, "PEM file of --tls_client_cert's private key.")
  flags.DEFINE_string(
    "tls_server_name",
    None,
    "The name the server's certificate must carry, when --server's host is not on it (e.g. an IP address).",
  )
  flags.register_multi_flags_validator(
    ["tls_client_cert", "tls_client_key"],
    lambda values: (values["tls_client_cert"] is None) == (values["tls_client_key"] is None),
    message="--tls_client_cert and --tls_client_key go together",
  )


def tls_from_flags() -> Tls | None:
  """The --tls* flags' TLS, or None for plaintext.

  Raises:
    ValueError: a PEM file can't be read or is not PEM (the message names the flag and file).
  """
  given = flags.FLAGS
  if not (given.tls or given.tls_root_certs or given.tls_client_cert or given.tls_client_key or given.tls_server_name):
    return None
  return Tls(
    root_certs=_read_pem("tls_root_certs", given.tls_root_certs),
    client_cert=_read_pem("tls_client_cert", given.tls_client_cert),
    client_key=_read_pem("tls_client_key", given.tls_client_key),
    server_name=given.tls_server_name,
  )


def _read_pem(flag: str, path: str | None) -> bytes | None:
  """A PEM file's contents (None without a file); checked here, as gRPC reports a bad one only as a
  failed connection."""
  if path is None:
    return None
  try:
    with open(path, "rb") as f:
      pem = f.read()
  except OSError as e:
    raise ValueError(f"--{flag}: cannot read {path}: {e.strerror or e}") from None
  if b"-----BEGIN " not in pem:
    raise ValueError(f"--{flag}: {path} is not a PEM file (no -----BEGIN line)")
  return pem
