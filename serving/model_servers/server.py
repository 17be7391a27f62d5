"""Wires the core, front ends, batching and monitoring into one server."""

import contextlib
import dataclasses
import os
import threading

from absl import logging
from tensorflow.core.protobuf import config_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import errors
from serving.batching import batch_scheduler, batching_session
from serving.config import protos, text_config
from serving.core import loader, server_core
from serving.model_servers import grpc_server, http_server, native_server, service_impl
from serving.monitoring import metrics as metrics_lib
from serving.servables import native_bundle, request_limits, saved_model_bundle

DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"

# --rest_api_port value binding REST to a port the kernel picks (reported on
# `Server.rest_port` and in --port_file). Not a TF Serving value: there, as
# here, 0 disables REST, so 0 can't also mean "any port" as --port=0 does.
REST_API_ANY_PORT = -1


@dataclasses.dataclass
class Options:
  """Server options; fields mirror TF Serving's flags of the same name."""

  host: str = "127.0.0.1"
  port: int = 8500
  grpc_socket_path: str = ""
  rest_api_port: int = 0  # 0: REST off; REST_API_ANY_PORT: a free port.
  rest_api_num_threads: int = 8
  rest_api_timeout_in_ms: int = 30000
  rest_api_enable_cors_support: bool = False
  grpc_max_threads: int = 8
  grpc_channel_arguments: list[tuple[str, object]] = dataclasses.field(default_factory=list)
  enable_grpc_healthcheck_service: bool = False
  model_name: str = "default"
  model_base_path: str = ""
  model_config_file: str = ""
  model_config_file_poll_wait_seconds: float = 0
  file_system_poll_wait_seconds: float = 1
  allow_version_labels_for_unavailable_models: bool = False
  num_load_threads: int = 0
  num_unload_threads: int = 0
  max_num_load_retries: int = 5
  load_retry_interval_micros: int = 60 * 1000 * 1000
  saved_model_tags: str = "serve"
  session_config: config_pb2.ConfigProto | None = None
  enable_model_warmup: bool = True
  retain_freed_memory: bool = False
  num_request_iterations_for_warmup: int = 0
  enable_batching: bool = False
  batching_parameters_file: str = ""
  monitoring_config_file: str = ""
  enable_signature_method_name_check: bool = False
  enable_serialization_as_tensor_content: bool = False
  # Hardening (fgr-serve's own flags).
  ssl_config_file: str = ""
  grpc_max_receive_message_length: int = 64 << 20
  rest_api_max_body_bytes: int = 64 << 20
  rest_api_max_connections: int = 0  # 0: derived (http_server.default_max_connections), < 0: none.
  rest_api_max_buffered_bytes: int = 0  # 0: derived (http_server.HttpServer), < 0: none.
  max_batch_size_per_request: int = 0
  max_in_flight_requests: int = 0
  # Request expansion (request_limits.py): > 0 a limit, 0 derived, < 0 none.
  max_elements_per_request: int = 0
  max_bytes_per_request: int = 0
  max_elements_per_batch: int = 0
  max_bytes_per_batch: int = 0
  expansion_limit_rows: int = request_limits.DEFAULT_ROWS
  model_base_path_roots: list[str] = dataclasses.field(default_factory=list)
  # The native data plane (native_server.MODES): auto, on or off.
  native: str = native_server.AUTO


class Server:
  """A TF Serving-compatible model server.

  Args:
    options: Server options.
  """

  def __init__(self, options: Options):
    self.options = options
    self.metrics = metrics_lib.Metrics()
    self._scheduler: batch_scheduler.SharedBatchScheduler | None = None  # Or the native BatchScheduler.
    self._grpc: grpc_server.GrpcServer | native_server.NativeGrpcServer | None = None
    self._http: http_server.HttpServer | None = None
    self._stop = threading.Event()
    self._config_thread: threading.Thread | None = None
    self.grpc_port = 0
    self.rest_port = 0
    self.core: server_core.ServerCore | None = None

  def _model_server_config(self) -> model_server_config_pb2.ModelServerConfig:
    options = self.options
    if options.model_config_file:
      with contextlib.suppress(OSError):  # Else parse_text_proto names the error.
        if os.path.getsize(options.model_config_file) == 0:
          # As TF Serving, which can't read (mmap) an empty file: most likely one caught mid-write.
          # A file with only comments is an empty config: the server starts with no model.
          raise errors.invalid_argument(
            f"--model_config_file {options.model_config_file} is empty (0 bytes); for no model yet, "
            "write `model_config_list {}` or a comment"
          )
      return text_config.parse_text_proto(options.model_config_file, model_server_config_pb2.ModelServerConfig)
    if not options.model_base_path:
      raise errors.invalid_argument("Both --model_config_file and --model_base_path are empty: one of them is required")
    # Ours: a relative --model_base_path is resolved against the working directory, as the shell
    # that typed it would (TF Serving refuses it; a relative base_path in a config is refused).
    base_path = options.model_base_path
    if server_core.is_relative_path(base_path):
      base_path = os.path.abspath(base_path)
    return server_core.single_model_config(options.model_name, base_path)

  def _batching(self, native) -> loader.BatchingConfig | None:
    """Batching set-up from the flags; `native`: the native module, whose
    scheduler then batches."""
    options = self.options
    if not options.enable_batching:
      if options.batching_parameters_file:
        raise errors.invalid_argument("--batching_parameters_file requires --enable_batching")
      return None
    params = protos.BatchingParameters()
    if options.batching_parameters_file:
      params = text_config.parse_text_proto(options.batching_parameters_file, protos.BatchingParameters)
    queue_options = batching_session.queue_options_from_proto(params, native=native is not None)
    threads = params.num_batch_threads.value if params.HasField("num_batch_threads") else 0
    if threads <= 0:
      threads = os.cpu_count() or 1
    if native is not None:
      self._scheduler = native.BatchScheduler(threads)
    else:
      self._scheduler = batch_scheduler.SharedBatchScheduler(threads)
    logging.info("Batching enabled: %s, %d batch threads", queue_options, threads)
    return loader.BatchingConfig(self._scheduler, queue_options, self.metrics.batch_observer, self._expansion_limits())

  def _expansion_limits(self) -> request_limits.ExpansionLimits:
    options = self.options
    if options.expansion_limit_rows < 1:
      raise errors.invalid_argument("--expansion_limit_rows must be positive")
    return request_limits.ExpansionLimits(
      max_elements_per_request=options.max_elements_per_request,
      max_bytes_per_request=options.max_bytes_per_request,
      max_elements_per_batch=options.max_elements_per_batch,
      max_bytes_per_batch=options.max_bytes_per_batch,
      rows=options.expansion_limit_rows,
    )

  def _prometheus_path(self) -> str | None:
    if not self.options.monitoring_config_file:
      return None
    config = text_config.parse_text_proto(self.options.monitoring_config_file, protos.MonitoringConfig)
    if not config.prometheus_config.enable:
      return None
    path = config.prometheus_config.path or DEFAULT_PROMETHEUS_PATH
    if not path.startswith("/"):  # No request path matches it: metrics would silently never be served.
      raise errors.invalid_argument(
        f"--monitoring_config_file: prometheus_config.path must start with '/' (got {path!r}), e.g. "
        f"{DEFAULT_PROMETHEUS_PATH!r}"
      )
    return path

  def start(self) -> None:
    """Loads the models, then opens the gRPC (and REST) ports.

    As TF Serving, ports open only once every configured model has a
    version AVAILABLE; a model whose versions all fail stops the start-up.

    Raises:
      ServingError: on bad configuration or failed initial loads.
    """
    options = self.options
    config = self._model_server_config()
    prometheus_path = self._prometheus_path()
    ssl_config = None
    if options.ssl_config_file:
      ssl_config = text_config.parse_text_proto(options.ssl_config_file, protos.SSLConfig)
      grpc_server.check_ssl_config(ssl_config)
    if options.rest_api_port < REST_API_ANY_PORT:
      raise errors.invalid_argument(
        f"--rest_api_port={options.rest_api_port}: expected a port, 0 "
        f"(REST disabled) or {REST_API_ANY_PORT} (any free port)"
      )
    if prometheus_path and not options.rest_api_port:
      raise errors.invalid_argument(
        "--monitoring_config_file enables Prometheus metrics, which are served on the REST port: set --rest_api_port"
      )
    native = native_server.choose(options.native)
    native_runtime = routes = admission = None
    if native is not None:
      native_metrics = native.Metrics(list(metrics_lib.LATENCY_BUCKETS_US), list(metrics_lib.BATCH_BUCKETS))
      self.metrics.attach_native(native_metrics)
      native_runtime = native_bundle.NativeRuntime(native, native_metrics, self._expansion_limits())
      routes = native_server.Routes()
      if options.max_in_flight_requests > 0:
        admission = native.Admission(options.max_in_flight_requests)
    loader_options = loader.LoaderOptions(
      tags=[t for t in options.saved_model_tags.split(",") if t],
      session_config=options.session_config,
      enable_warmup=options.enable_model_warmup,
      warmup_iterations=max(1, options.num_request_iterations_for_warmup),
      max_num_load_retries=max(0, options.max_num_load_retries),
      load_retry_interval_seconds=max(0.0, options.load_retry_interval_micros / 1e6),
      batching=self._batching(native),
      allowed_roots=tuple(options.model_base_path_roots),
      reserve_next_version_memory=options.retain_freed_memory,
      native=native_runtime,
    )
    self.core = server_core.ServerCore(
      loader_options,
      options.num_load_threads,
      options.num_unload_threads,
      options.allow_version_labels_for_unavailable_models,
      routes,
    )
    self.core.reload_config(config, wait=False)
    if options.file_system_poll_wait_seconds >= 0:
      self.core.start_polling(options.file_system_poll_wait_seconds)
    self.core.wait_until_models_available(stop=self._stop)
    if self._stop.is_set():
      return  # Shut down while waiting for models: nothing to serve.
    # Labels (and their checks) apply once the initial versions are up.
    self.core.reload_config(config)
    if options.model_config_file and (options.model_config_file_poll_wait_seconds > 0):
      self._config_thread = threading.Thread(target=self._poll_config, name="config-poll", daemon=True)
      self._config_thread.start()

    self.api = api = service_impl.ServingApi(
      self.core,
      self.metrics,
      options.enable_signature_method_name_check,
      options.enable_serialization_as_tensor_content,
      options.max_batch_size_per_request,
      options.max_in_flight_requests,
      self._expansion_limits(),
      admission,
    )
    if native is not None:
      self._grpc = native_server.NativeGrpcServer(
        native,
        api,
        routes,
        native_runtime.metrics,
        admission,
        options.grpc_max_threads,
        options.grpc_channel_arguments,
        options.enable_grpc_healthcheck_service,
        options.grpc_max_receive_message_length or -1,
        ssl_config,
        options.max_batch_size_per_request,
        options.enable_signature_method_name_check,
        options.enable_serialization_as_tensor_content,
        saved_model_bundle.caller_thread(options.session_config),
      )
    else:
      self._grpc = grpc_server.GrpcServer(
        api,
        options.grpc_max_threads,
        options.grpc_channel_arguments,
        options.enable_grpc_healthcheck_service,
        options.grpc_max_receive_message_length or -1,
        grpc_server.ssl_credentials(ssl_config) if ssl_config is not None else None,
      )
    addresses = []
    if options.port or not options.grpc_socket_path:
      addresses.append(f"{options.host}:{options.port}")
    if options.grpc_socket_path:
      addresses.append(f"unix:{options.grpc_socket_path}")
    ports = self._grpc.serve(addresses)
    if options.port or not options.grpc_socket_path:
      self.grpc_port = ports[0]
    logging.info("Running gRPC ModelServer at %s:%d ...", options.host, self.grpc_port)
    if options.rest_api_port:
      self._http = http_server.HttpServer(
        api,
        options.host,
        max(0, options.rest_api_port),
        num_threads=options.rest_api_num_threads,
        timeout_ms=options.rest_api_timeout_in_ms,
        enable_cors=options.rest_api_enable_cors_support,
        prometheus_path=prometheus_path,
        max_body_bytes=max(0, options.rest_api_max_body_bytes),
        max_connections=options.rest_api_max_connections,
        max_buffered_bytes=options.rest_api_max_buffered_bytes,
      )
      self.rest_port = self._http.port
      self._http.start()
      logging.info("Exporting HTTP/REST API at:%s:%d ...", options.host, self.rest_port)

  def _poll_config(self) -> None:
    """Re-applies --model_config_file whenever it differs from the config
    in force (as TF Serving, the file wins over earlier reload RPCs), and
    after a reload of it failed: TF Serving reloads the file at every poll,
    so a label naming a version that is still to come applies once it serves."""
    wait = self.options.model_config_file_poll_wait_seconds
    last_error = None
    failed = False  # The last reload raised: try it again even if the file is unchanged.
    while not self._stop.wait(wait):
      try:
        config = self._model_server_config()
        if failed or config != self.core.config:
          failed = True
          self.core.reload_config(config)
          failed = False
          logging.info("Reloaded model config from %s", self.options.model_config_file)
        last_error = None
      except Exception as e:  # Any failure: keep the config in force and keep polling.
        error = e.message if isinstance(e, errors.ServingError) else f"{type(e).__name__}: {e}"
        if error != last_error:  # A file that stays bad is logged once, not every poll.
          logging.error(
            "Reloading %s failed: %s",
            self.options.model_config_file,
            error,
            exc_info=not isinstance(e, errors.ServingError),
          )
        last_error = error

  def request_stop(self) -> None:
    """Ends a start-up still waiting for models (signal-safe)."""
    self._stop.set()

  def stop(self, grace_seconds: float = 30.0) -> None:
    """Graceful stop: refuse new requests, drain in-flight ones, unload.

    Health turns NOT_SERVING first, for every service, so load balancers stop
    sending to this replica while REST, then gRPC, drain. The health service
    keeps answering NOT_SERVING until gRPC itself stops. The same steps stop
    the native front end; versions unload after it has drained.
    """
    self._stop.set()
    if self._scheduler is not None:
      # Queued calls run now rather than wait out batch_timeout_micros, which may exceed the grace.
      self._scheduler.drain()
    if self.core is not None:
      self.core.shut_down()  # A reload still waiting for loads answers now, not after their retries.
    if self._grpc is not None:
      self._grpc.set_not_serving()
    if self._http is not None:
      self._http.stop()
    if self._grpc is not None:
      self._grpc.stop(grace_seconds)
    if self.core is not None:
      self.core.stop(grace_seconds)
    if self._scheduler is not None:
      self._scheduler.stop()
