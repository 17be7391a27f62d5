"""The native data plane behind the public gRPC port (--native, #26).

`_fgr_native.Server` (serving/native) owns the gRPC port: it decodes,
batches, runs and encodes the Predict calls it can answer in C++, without the
GIL, and hands every other call to `Fallback`, which answers it with the same
`ServingApi` the Python gRPC front end uses. Python keeps the control plane:
it loads versions (servables/native_bundle.py) and tells the native server
which versions and labels each model serves (`Routes`, from ServerCore).
"""

import threading
from types import ModuleType
from typing import Any

import grpc
from absl import logging

from serving import errors
from serving.model_servers import rpc_methods, service_impl

AUTO, ON, OFF = "auto", "on", "off"
MODES = (AUTO, ON, OFF)


def load_module() -> tuple[ModuleType | None, str]:
  """The native module, loaded and initialised (serving.native), or (None,
  why it is not available)."""
  try:
    from serving import native  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"serving.native is missing ({e})"
  if not hasattr(native, "module"):  # A bare directory (namespace package).
    return None, "serving/native/__init__.py is missing"
  module = native.module()
  if module is None:
    return None, native.unavailable_reason()
  return module, ""


def choose(mode: str) -> ModuleType | None:
  """The native module the server runs on under --native=`mode`, or None
  for the Python path.

  auto: native when built, else Python with one log line saying why; on:
  native or a start-up error; off: Python.

  Raises:
    ServingError: FAILED_PRECONDITION for --native=on without the module,
      INVALID_ARGUMENT for an unknown mode.
  """
  if mode not in MODES:
    raise errors.invalid_argument(f"--native={mode}: expected one of {', '.join(MODES)}")
  if mode == OFF:
    return None
  module, reason = load_module()
  if module is not None:
    logging.info("Serving gRPC through the native data plane (--native=%s)", mode)
    return module
  if mode == ON:
    raise errors.failed_precondition(
      f"--native=on, but the native data plane is unavailable: {reason}. "
      "Build it (python -m serving.native.build, or make install) or run with --native=auto|off"
    )
  logging.info("Native data plane unavailable (%s): serving gRPC on the Python path", reason)
  return None


def tls(config) -> tuple[str, str, str, bool] | None:
  """`_fgr_native.Server`'s TLS argument from TF Serving's SSLConfig
  (validated by the caller, grpc_server.check_ssl_config)."""
  if config is None:
    return None
  return (config.server_key, config.server_cert, config.custom_ca, bool(config.client_verify))


class Fallback:
  """Answers the calls the native front end hands to Python, exactly as
  grpc_server does: the same `rpc_methods.RPC_METHODS`, the same errors.

  Called by `_fgr_native.Server` from its fallback threads, holding the GIL:
  `fallback(method path, request bytes, timeout_ms or None)` returns
  (status code, message, response bytes).

  Args:
    api: The RPC implementations, or None until the server has them (no
      call arrives before the server starts).
  """

  def __init__(self, api: service_impl.ServingApi | None = None):
    self.api = api
    self._methods = {method.path: method for method in rpc_methods.RPC_METHODS}

  def __call__(self, method: str, request: bytes, timeout_ms: int | None) -> tuple[int, str, bytes]:
    rpc = self._methods.get(method)
    if rpc is None:
      return grpc.StatusCode.UNIMPLEMENTED.value[0], f"Method not found: {method}", b""
    try:
      response = rpc.run(self.api, rpc.parse(request), timeout_ms)
    except Exception as e:  # pylint: disable=broad-except
      # Answered here, with the tracebacks dropped (errors.answered), so that the request their
      # frames hold is freed now, not at the next cyclic collection.
      error = errors.answered(e)
      return error.code.value[0], error.message, b""
    return grpc.StatusCode.OK.value[0], "", response.SerializeToString()


class Routes:
  """ServerCore's router (server_core.Router) for the native front end:
  each model's AVAILABLE versions as their native Servables, and the labels
  that point at one of them.

  A label naming a version the native side doesn't serve is left out, so its
  requests go to Python, which answers them as ServerCore resolves them
  (--allow_version_labels_for_unavailable_models).

  Versions load before the gRPC port opens: until a server is attached, the
  routes are kept and handed over on `attach`.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._server = None
    self._models: dict[str, tuple[dict[int, Any], dict[str, int]]] = {}

  def set_model(self, name: str, versions: dict, labels: dict[str, int]) -> None:
    servables = {version: bundle.servable for version, bundle in versions.items()}
    routed = {label: version for label, version in labels.items() if version in servables}
    with self._lock:
      if servables:
        self._models[name] = (servables, routed)
      else:
        self._models.pop(name, None)
      if self._server is not None:
        self._server.set_model(name, servables, routed)

  def attach(self, server: Any) -> None:
    """Routes `server`'s requests from now on (None: stop telling it)."""
    with self._lock:
      self._server = server
      if server is not None:
        for name, (servables, labels) in self._models.items():
          server.set_model(name, servables, labels)


class NativeGrpcServer:
  """The public gRPC port on `_fgr_native.Server`, with GrpcServer's methods.

  Args:
    module: The native module.
    api: The RPC implementations answering what the native path hands back.
    routes: Where ServerCore publishes each model's versions and labels.
    metrics: The native `Metrics` the front end records its requests in.
    admission: The native `Admission` shared with `api`, or None.
    max_threads: Fallback threads (--grpc_max_threads).
    options: Extra channel arguments (--grpc_channel_arguments).
    enable_health: Serve grpc.health.v1 (--enable_grpc_healthcheck_service).
    max_receive_message_length: Largest request, in bytes; -1: no limit.
    ssl_config: TF Serving's SSLConfig for TCP ports, or None (plaintext).
      UNIX sockets stay plaintext.
    max_batch_size_per_request: --max_batch_size_per_request (0: none).
    method_name_check: --enable_signature_method_name_check.
    as_tensor_content: --enable_serialization_as_tensor_content.
    unbatched_in_caller_thread: Run each unbatched request's ops in the
      thread that read it, not in TF's inter-op pool (see `caller_thread`).
  """

  def __init__(
    self,
    module: ModuleType,
    api: service_impl.ServingApi,
    routes: Routes,
    metrics: Any,
    admission: Any,
    max_threads: int,
    options: list[tuple[str, object]],
    enable_health: bool,
    max_receive_message_length: int = -1,
    ssl_config=None,
    max_batch_size_per_request: int = 0,
    method_name_check: bool = False,
    as_tensor_content: bool = False,
    unbatched_in_caller_thread: bool = True,
  ):
    self._routes = routes
    self._server = module.Server(
      Fallback(api),
      metrics,
      admission,
      max_receive_message_length,
      list(options),
      tls(ssl_config),
      enable_health,
      max(0, max_batch_size_per_request),
      method_name_check,
      as_tensor_content,
      max(1, max_threads),
      unbatched_in_caller_thread,
    )
    routes.attach(self._server)
    self._started = False
    self._stopped = False

  def serve(self, addresses: list[str]) -> list[int]:
    """Binds `addresses` ("host:port", port 0: any; or "unix:path") and
    starts serving; returns the bound ports in the same order.

    Raises:
      RuntimeError: "Failed to bind gRPC server to ..." if one can't be bound.
    """
    for address in addresses:
      self._server.add_port(address)
    ports = self._server.start()
    self._started = True
    return list(ports)

  def set_not_serving(self) -> None:
    """Health checks answer NOT_SERVING for every service from now on (the
    first step of a shutdown)."""
    if self._started and not self._stopped:
      self._server.set_serving(False)

  def stop(self, grace_seconds: float) -> None:
    """Stops accepting RPCs and waits for in-flight ones, up to the grace."""
    if self._stopped:
      return
    self._stopped = True
    self._server.set_serving(False)
    self._server.shutdown(grace_seconds)
    self._routes.attach(None)
