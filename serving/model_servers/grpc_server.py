"""gRPC front end: PredictionService, ModelService and health checking.

The server is a `grpc.aio` server on its own event-loop thread. Predict is
validated and answered on the loop; a batched call waits in its batch queue
as a future that the batch thread completes (one loop wake-up per batch), and
an unbatched call runs its session on the worker pool. Every other RPC runs
on the worker pool as a whole. No request holds a thread while it waits, and
no hand-off goes through a per-request thread, which is what a thread-pool
`grpc.server` costs on every call.
"""

import asyncio
import concurrent.futures
import functools
import logging
import os
import ssl
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving import errors
from serving.model_servers import rpc_methods, service_impl

R = TypeVar("R")

PREDICTION_SERVICE = rpc_methods.PREDICTION_SERVICE
MODEL_SERVICE = rpc_methods.MODEL_SERVICE
# The most request metadata (headers) either path accepts.
MAX_METADATA_BYTES = 16 * 1024
# Calls gRPC core holds for the server before the event loop takes them (grpcio's defaults: 1,000,
# then randomly more refused up to 3,000). The loop takes calls one at a time, so a burst of a few
# thousand calls outran those and core cancelled valid calls (CANCELLED, as if the client had), which
# the server never sees and cannot count. Calls taken are shed by --max_in_flight_requests with
# RESOURCE_EXHAUSTED and counted; this bound only keeps what core holds finite. A pending call holds
# its headers and at most a flow-control window of its message.
MAX_PENDING_CALLS = 1 << 16


class _Malformed:
  """Stands in for a request whose bytes did not parse."""

  def __init__(self, error: errors.ServingError):
    self.message = error.message


def _parser(method: rpc_methods.RpcMethod) -> Callable[[bytes], Any]:
  """A deserializer that never raises (grpc would answer INTERNAL)."""

  def parse(data: bytes):
    try:
      return method.parse(data)
    except errors.ServingError as e:
      return _Malformed(e)

  return parse


def _timeout_ms(context: grpc.aio.ServicerContext) -> int | None:
  """Milliseconds to the client's deadline: the bound of its wait for a batch (a run is not cut short)."""
  remaining = context.time_remaining()
  if remaining is None or remaining > 1e8:
    return None
  return max(1, int(remaining * 1000))


class _Pool:
  """Runs blocking RPC implementations on the worker threads."""

  def __init__(self, executor: concurrent.futures.Executor):
    self.executor = executor

  async def run(self, function: Callable[..., R], *args) -> R:
    return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(function, *args))


def _implementation(method: rpc_methods.RpcMethod, api: service_impl.ServingApi, pool: _Pool):
  """The coroutine answering `method`: Predict is validated and answered on
  the loop (`ServingApi.predict_async`); every other method runs as a whole
  on the worker pool."""
  if method.path == f"/{PREDICTION_SERVICE}/Predict":

    async def predict(request, context):
      return await api.predict_async(request, _timeout_ms(context), pool.executor)

    return predict

  async def call(request, context):
    return await pool.run(method.run, api, request, _timeout_ms(context))

  return call


def _fail(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
  """Sets the call's error status; the handler then returns None."""
  context.set_code(code)
  context.set_details(errors.status_message(message))


def _generic_handlers(api: service_impl.ServingApi, pool: _Pool) -> list[grpc.GenericRpcHandler]:
  """One handler per service of `rpc_methods.RPC_METHODS`. Unparsable
  requests get INVALID_ARGUMENT, as TF Serving answers any malformed input,
  and any failure becomes a status, never a crash."""

  def behaviour(implementation):
    async def call(request, context: grpc.aio.ServicerContext):
      # Failures set the status and return no response (grpc.aio then sends none) rather than
      # `context.abort`, whose AbortError grpc keeps in a reference cycle with this frame, and so with
      # the request, until the cyclic collector runs.
      if isinstance(request, _Malformed):
        _fail(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return None
      try:
        return await implementation(request, context)
      except Exception as e:  # pylint: disable=broad-except
        # Answered here, with the tracebacks dropped (errors.answered), so that the request their
        # frames hold is freed now.
        error = errors.answered(e)
        _fail(context, error.code, error.message)
        return None

    return call

  by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
  for method in rpc_methods.RPC_METHODS:
    by_service.setdefault(method.service, {})[method.name] = grpc.unary_unary_rpc_method_handler(
      behaviour(_implementation(method, api, pool)),
      request_deserializer=_parser(method),
      response_serializer=method.response_type.SerializeToString,
    )
  return [grpc.method_handlers_generic_handler(service, handlers) for service, handlers in by_service.items()]


def server_options(max_receive_message_length: int, options: list[tuple[str, object]]) -> list[tuple[str, object]]:
  """The grpc.aio server's channel arguments: ours, then `options` (--grpc_channel_arguments), which
  replace those of ours they name."""
  defaults = [
    ("grpc.max_receive_message_length", max_receive_message_length),
    ("grpc.max_send_message_length", -1),
    # grpcio rejects request metadata between its soft limit (8 KiB) and hard one (16 KiB) at random.
    # One limit, 16 KiB, as the native server's (serving/native/cc/server.cc): a request's headers
    # pass or fail the same on every call and on both paths.
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
    # One bound, so core refuses no call below it (soft < hard would refuse at random between).
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
  ]
  named = {key for key, _ in options}
  return [(key, value) for key, value in defaults if key not in named] + list(options)


# grpcio's asyncio server logs this, with a traceback, when it cannot send an answer: the call had
# ended first, as when its client cancels it just as it is answered (grpc/grpc#32551).
_UNSENT_ANSWER = "ExecuteBatchError raised in core by servicer method"


class UnsentAnswerFilter(logging.Filter):
  """Makes grpcio's report of an answer it could not send one warning line, without the traceback:
  any client can cause it, so each report must not write a dozen lines to the server's log."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and str(record.msg).startswith(_UNSENT_ANSWER):
      record.msg = f"{record.getMessage()}: the answer was not sent (the call had ended, e.g. cancelled by its client)"
      record.args = ()
      record.exc_info = record.exc_text = None
      record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


_UNSENT_ANSWER_FILTER = UnsentAnswerFilter()


class GrpcServer:
  """Owns the grpc.aio server and the event-loop thread it runs on.

  Args:
    api: Shared RPC implementations.
    max_threads: Worker threads for session runs and blocking RPCs (TF
      Serving's --grpc_max_threads).
    options: Extra channel arguments (--grpc_channel_arguments).
    enable_health: Register grpc.health.v1 (--enable_grpc_healthcheck_service).
    max_receive_message_length: Largest request accepted, in bytes; larger
      ones fail with RESOURCE_EXHAUSTED before they are parsed. -1: no limit.
    credentials: TLS credentials for TCP ports (--ssl_config_file), or None
      for plaintext. UNIX sockets stay plaintext (local, file permissions).
  """

  def __init__(
    self,
    api: service_impl.ServingApi,
    max_threads: int,
    options: list[tuple[str, object]],
    enable_health: bool,
    max_receive_message_length: int = -1,
    credentials: grpc.ServerCredentials | None = None,
  ):
    self._credentials = credentials
    logging.getLogger("grpc._cython.cygrpc").addFilter(_UNSENT_ANSWER_FILTER)  # Once: the same object.
    channel_options = server_options(max_receive_message_length, options)
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, max_threads), thread_name_prefix="grpc")
    pool = _Pool(self._executor)
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
    self._thread.start()
    self._health = health.aio.HealthServicer() if enable_health else None

    async def create() -> grpc.aio.Server:
      server = grpc.aio.server(options=channel_options)
      server.add_generic_rpc_handlers(_generic_handlers(api, pool))
      if self._health is not None:
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
      return server

    self._server = self._on_loop(create())

  def _on_loop(self, coroutine) -> Any:
    """Runs a coroutine on the server's loop and waits for its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

  def add_port(self, address: str) -> int:
    """Binds `address` ("host:port" or "unix:path"); returns the port."""

    async def bind() -> int:
      if self._credentials is not None and not address.startswith("unix:"):
        return self._server.add_secure_port(address, self._credentials)
      return self._server.add_insecure_port(address)

    try:
      port = self._on_loop(bind())
    except RuntimeError as e:  # grpc.aio raises where grpc.server returned 0.
      raise RuntimeError(f"Failed to bind gRPC server to {address}: {e}") from e
    if port == 0 and not address.startswith("unix:"):
      raise RuntimeError(f"Failed to bind gRPC server to {address}")
    return port

  def serve(self, addresses: list[str]) -> list[int]:
    """Binds `addresses` (see add_port) and starts serving; returns the
    bound ports in the same order."""
    ports = [self.add_port(address) for address in addresses]
    self.start()
    return ports

  def start(self) -> None:
    self._on_loop(self._server.start())
    self._set_health(health_pb2.HealthCheckResponse.SERVING)

  def _set_health(self, status) -> None:
    if self._health is not None:
      for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
        self._on_loop(self._health.set(service, status))

  def set_not_serving(self) -> None:
    """Health-checks answer NOT_SERVING for every service from now on.

    The first step of a shutdown, before any front end drains, so that load
    balancers stop sending while in-flight calls finish.
    """
    if self._loop.is_running():
      self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

  async def _stop_and_end_handlers(self, grace_seconds: float) -> None:
    """grpc.aio's stop, then every handler it cut short is run to its end.

    The stop cancels the handlers left at the end of the grace, but returns before they unwind. A
    handler left suspended once the loop closes would hold its version forever (its `with` block),
    and the version's unload, and the process's exit, would wait on it.
    """
    await self._server.stop(grace_seconds)
    handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in handlers:
      task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)

  def stop(self, grace_seconds: float) -> None:
    """Stops accepting RPCs and waits for in-flight ones to finish."""
    if not self._loop.is_running():
      return
    self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    self._on_loop(self._stop_and_end_handlers(grace_seconds))
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join()
    self._loop.close()
    self._executor.shutdown(wait=True)


def check_ssl_config(config) -> None:
  """Validates TF Serving's SSLConfig (PEM contents) for a TLS server port.

  Args:
    config: A `tensorflow.serving.SSLConfig`: `server_key` and `server_cert`
      hold PEM text; `custom_ca` the PEM roots client certificates must chain
      to, required when `client_verify` is set (mutual TLS).

  Raises:
    ServingError: INVALID_ARGUMENT if the key or certificate is missing, or
      if they or custom_ca aren't PEM text that TLS can use (gRPC itself
      would only fail to bind the port, after every model loaded).
  """
  if not config.server_key or not config.server_cert:
    raise errors.invalid_argument("--ssl_config_file: SSLConfig needs both server_key and server_cert (PEM contents)")
  if config.client_verify and not config.custom_ca:
    raise errors.invalid_argument(
      "--ssl_config_file: client_verify needs custom_ca (PEM roots that client certificates must chain to)"
    )
  for field in ("server_key", "server_cert", "custom_ca"):
    value = getattr(config, field)
    if value and "-----BEGIN " not in value:
      shown = value if len(value) <= 80 else value[:77] + "..."
      raise errors.invalid_argument(
        f"--ssl_config_file: {field} must hold PEM text (-----BEGIN ...), not a file name: got {shown!r}"
      )
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  try:
    if config.custom_ca:
      context.load_verify_locations(cadata=config.custom_ca)
  except (ssl.SSLError, ValueError) as e:
    raise errors.invalid_argument(f"--ssl_config_file: custom_ca holds no usable PEM certificate: {e}") from e
  _check_key_pair(context, config.server_key, config.server_cert)


def _check_key_pair(context: ssl.SSLContext, key: str, cert: str) -> None:
  """Raises INVALID_ARGUMENT unless `cert` and `key` (PEM text) form a
  pair TLS can serve with. OpenSSL reads them from memory files (Linux),
  so the key never touches the disk; elsewhere gRPC checks them at bind."""
  if not hasattr(os, "memfd_create"):
    return
  files = []
  try:
    for name, text in (("cert", cert), ("key", key)):
      fd = os.memfd_create(f"fgr-ssl-{name}", os.MFD_CLOEXEC)
      files.append(fd)
      os.write(fd, text.encode())
    # An encrypted key gets an empty password (gRPC takes none) rather than a prompt on the terminal.
    context.load_cert_chain(f"/proc/self/fd/{files[0]}", f"/proc/self/fd/{files[1]}", password=lambda: b"")
  except (ssl.SSLError, ValueError) as e:
    raise errors.invalid_argument(
      f"--ssl_config_file: server_key and server_cert aren't a PEM private key and its certificate: {e}"
    ) from e
  except OSError:  # No memory files here (or no /proc): gRPC checks them at bind.
    return
  finally:
    for fd in files:
      os.close(fd)


def ssl_credentials(config) -> grpc.ServerCredentials:
  """gRPC server credentials from TF Serving's SSLConfig (see `check_ssl_config`).

  Raises:
    ServingError: INVALID_ARGUMENT if the key or certificate is missing.
  """
  check_ssl_config(config)
  return grpc.ssl_server_credentials(
    [(config.server_key.encode(), config.server_cert.encode())],
    root_certificates=config.custom_ca.encode() or None,
    require_client_auth=config.client_verify,
  )
