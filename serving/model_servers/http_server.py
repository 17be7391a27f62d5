"""REST front end: TF Serving's /v1/models API and the Prometheus endpoint.

Built on the standard library's http.server: the API is small JSON over
HTTP/1.x, and a fixed worker pool (TF Serving's --rest_api_num_threads) is a
few lines, so no web framework dependency is needed.
"""

import concurrent.futures
import http.server
import json
import re
import socket
import threading
import urllib.parse
from typing import Any

import tensorflow as tf
from absl import logging
from google.protobuf import json_format
from tensorflow_serving.apis import (
  classification_pb2,
  get_model_metadata_pb2,
  get_model_status_pb2,
  model_pb2,
  predict_pb2,
  regression_pb2,
)

from serving import errors
from serving.model_servers import service_impl
from serving.monitoring import metrics as metrics_lib
from serving.servables import get_model_metadata, saved_model_bundle, tensor_util
from serving.util import json_tensor

# TF Serving's request path patterns (http_rest_api_util.h).
_PREDICTION_API = re.compile(
  r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|"
  r"(?:/labels/([^/:]+)))?:(classify|regress|predict)"
)
_MODEL_STATUS_API = re.compile(
  r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|"
  r"(?:/labels/([^/:]+)))?(?:/(metadata))?"
)


# What a CORS preflight's Origin header must hold (TF Serving: RE2::PartialMatch "https?://").
_HTTP_ORIGIN = re.compile(r"https?://")
# A \u escape of a UTF-16 surrogate: a body without one can't hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\\ud800-\\udfff]")


def _has_lone_surrogate(value: Any) -> bool:
  """Whether a parsed JSON value holds a string or key with an unpaired surrogate (paired escapes
  were already joined into one character by the parser)."""
  stack = [value]
  while stack:
    item = stack.pop()
    if isinstance(item, str):
      if _LONE_SURROGATE.search(item):
        return True
    elif isinstance(item, dict):
      stack.extend(item.keys())
      stack.extend(item.values())
    elif isinstance(item, list):
      stack.extend(item)
  return False


def _model_spec(name: str, version: str | None, label: str | None) -> model_pb2.ModelSpec:
  spec = model_pb2.ModelSpec(name=urllib.parse.unquote(name))
  if version:
    try:
      spec.version.value = int(version)
    except ValueError as e:
      raise errors.invalid_argument(f"Failed to convert version: {version} to numeric.") from e
  if label:
    spec.version_label = urllib.parse.unquote(label)
  return spec


def _signature(bundle: saved_model_bundle.SavedModelBundle, signature_name: str):
  """The servable's SignatureDef named `signature_name` (or the default)."""
  name = signature_name or saved_model_bundle.DEFAULT_SERVING_SIGNATURE
  if name not in bundle.signature_defs:
    raise errors.invalid_argument(f'Serving signature name: "{name}" not found in signature def').with_context(
      bundle.context(name)
    )
  return bundle.signature_defs[name]


class RestApi:
  """Maps REST requests onto the shared RPC implementations.

  Args:
    api: The shared RPC implementations.
    timeout_ms: Deadline for each call (--rest_api_timeout_in_ms).
  """

  def __init__(self, api: service_impl.ServingApi, timeout_ms: int):
    self._api = api
    self._timeout_ms = timeout_ms if timeout_ms > 0 else None

  def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
    """Returns (HTTP status, JSON-able payload) for one request."""
    try:
      return 200, self._dispatch(method, path, body)
    except Exception as e:  # Every failure answers {"error": ...}.
      error = errors.from_exception(e)
      return error.http_status, {"error": error.message}

  def _dispatch(self, method: str, path: str, body: bytes) -> Any:
    malformed = errors.invalid_argument(f"Malformed request: {method} {path}")
    if method == "POST":
      match = _PREDICTION_API.fullmatch(path)
      if not match:
        raise malformed
      name, version, label, verb = match.groups()
      spec = _model_spec(name, version, label)
      request = self._json_body(body)
      if verb.lower() == "predict":
        return self._predict(spec, request)
      return self._examples(spec, request, verb.lower())
    if method == "GET":
      match = _MODEL_STATUS_API.fullmatch(path)
      if not match:
        raise malformed
      name, version, label, subresource = match.groups()
      if not name:
        raise errors.invalid_argument("Missing model name in request.")
      spec = _model_spec(name, version, label)
      if subresource:
        return self._metadata(spec)
      response = self._api.get_model_status(get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
      return json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
    raise malformed

  @staticmethod
  def _json_body(body: bytes) -> dict[str, Any]:
    try:
      request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
      raise errors.invalid_argument(f"JSON Parse error: {e}") from e
    except RecursionError as e:  # json's C parser counts nesting against
      # the interpreter's recursion limit, so deep bodies stop here.
      raise errors.invalid_argument("JSON Parse error: the body nests arrays or objects too deeply") from e
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(request):
      # Python's parser keeps an unpaired \uD800-\uDFFF escape as a lone surrogate, which is no
      # character and cannot be encoded; TF Serving's parser refuses it.
      raise errors.invalid_argument("JSON Parse error: a string holds an unpaired UTF-16 surrogate escape")
    if not isinstance(request, dict):
      raise errors.invalid_argument("JSON Value: request body must be a JSON object")
    signature_name = request.get("signature_name", "")
    if not isinstance(signature_name, str):
      raise errors.invalid_argument("'signature_name' must be a string")
    return request

  def _predict(self, spec: model_pb2.ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
    spec.signature_name = body.get("signature_name", "")
    row_format = False

    def build(bundle, check_costs: service_impl.CostCheck) -> predict_pb2.PredictRequest:
      nonlocal row_format
      signature = _signature(bundle, spec.signature_name)
      try:
        inputs, row_format = json_tensor.parse_predict_body(body, signature, check_costs)
      except errors.ServingError as e:  # Name the servable, as gRPC's errors for the same inputs do.
        raise e.with_context(
          bundle.context(spec.signature_name or saved_model_bundle.DEFAULT_SERVING_SIGNATURE)
        ) from None
      request = predict_pb2.PredictRequest(model_spec=spec)
      for alias, array in inputs.items():
        request.inputs[alias].CopyFrom(
          tensor_util.to_tensor_proto(array, signature.inputs[alias].dtype, as_tensor_content=True)
        )
      return request

    # One servable for the signature, the limits and the run (and admission
    # and metrics), as a gRPC Predict has.
    response = self._api.predict_built(spec, build, self._timeout_ms, "REST")
    outputs = {a: tf.make_ndarray(t) for a, t in response.outputs.items()}
    return json_tensor.predict_response_json(outputs, row_format)

  def _examples(self, spec: model_pb2.ModelSpec, body: dict[str, Any], verb: str) -> dict[str, Any]:
    spec.signature_name = body.get("signature_name", "")
    model_input = json_tensor.parse_examples_body(body)
    if verb == "classify":
      response = self._api.classify(
        classification_pb2.ClassificationRequest(model_spec=spec, input=model_input), self._timeout_ms, "REST"
      )
      return json_tensor.classification_json(response.result)
    response = self._api.regress(
      regression_pb2.RegressionRequest(model_spec=spec, input=model_input), self._timeout_ms, "REST"
    )
    return json_tensor.regression_json(response.result)

  def _metadata(self, spec: model_pb2.ModelSpec) -> dict[str, Any]:
    request = get_model_metadata_pb2.GetModelMetadataRequest(
      model_spec=spec, metadata_field=[get_model_metadata.SIGNATURE_DEF_FIELD]
    )
    response = self._api.get_model_metadata(request, entrypoint="REST")
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata[get_model_metadata.SIGNATURE_DEF_FIELD].Unpack(signature_map)

    def as_dict(message) -> dict:
      return json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
      )

    return {"model_spec": as_dict(response.model_spec), "metadata": {"signature_def": as_dict(signature_map)}}


class _BodyTooLarge(Exception):
  def __init__(self, size: int):
    super().__init__(size)
    self.size = size


def _read_chunked(rfile, limit: int) -> bytes:
  """A `Transfer-Encoding: chunked` body (RFC 9112 7.1), which http.server leaves to its handlers.

  Raises:
    _BodyTooLarge: the body passes `limit` bytes (0: no limit).
    ValueError: the chunks are malformed or end early.
  """
  parts, size = [], 0
  while True:
    line = rfile.readline(1024)
    if not line.endswith(b"\n"):
      raise ValueError("a chunk size line is cut short")
    try:
      chunk = int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
      raise ValueError(f"bad chunk size {line[:40]!r}") from None
    if chunk < 0:
      raise ValueError(f"bad chunk size {line[:40]!r}")
    if chunk == 0:
      break
    size += chunk
    if limit and size > limit:
      raise _BodyTooLarge(size)
    data = rfile.read(chunk)
    if len(data) != chunk or rfile.read(2) != b"\r\n":
      raise ValueError("a chunk ends early")
    parts.append(data)
  while True:  # Trailer fields, up to the empty line.
    line = rfile.readline(8192)
    if not line.endswith(b"\n"):
      raise ValueError("the trailer is cut short")
    if line in (b"\r\n", b"\n"):
      return b"".join(parts)


class _PooledHTTPServer(http.server.HTTPServer):
  """An HTTPServer handing each connection to a fixed thread pool."""

  # socketserver listens with a backlog of 5: under a burst of new connections the kernel then
  # drops or resets them before the pool sees them.
  request_queue_size = socket.SOMAXCONN

  def __init__(self, address, handler, num_threads: int):
    if ":" in address[0]:  # IPv6, e.g. --host=[::]
      self.address_family = socket.AF_INET6
      address = (address[0].strip("[]"), address[1])
    super().__init__(address, handler)
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="http")

  def process_request(self, request, client_address):
    self._pool.submit(self._process, request, client_address)

  def _process(self, request, client_address):
    try:
      self.finish_request(request, client_address)
    except Exception:  # http.server's own convention for handler errors.
      self.handle_error(request, client_address)
    finally:
      self.shutdown_request(request)

  def server_close(self):
    super().server_close()
    self._pool.shutdown(wait=True)  # Drain in-flight requests.


class HttpServer:
  """Serves the REST API (and Prometheus metrics) on one port.

  Args:
    api: Shared RPC implementations.
    host: Address to bind.
    port: Port to bind (0 picks a free one).
    num_threads: Worker threads.
    timeout_ms: Per-request deadline.
    enable_cors: Add CORS headers (--rest_api_enable_cors_support).
    prometheus_path: Where metrics are served, or None.
    max_body_bytes: Largest request body read; a larger Content-Length is
      answered 413 without reading the body (--rest_api_max_body_bytes).
      0 means no limit.
  """

  def __init__(
    self,
    api: service_impl.ServingApi,
    host: str,
    port: int,
    num_threads: int = 8,
    timeout_ms: int = 30000,
    enable_cors: bool = False,
    prometheus_path: str | None = None,
    max_body_bytes: int = 0,
  ):
    rest = RestApi(api, timeout_ms)
    metrics = api.metrics

    class Handler(http.server.BaseHTTPRequestHandler):
      """Routes one HTTP request."""

      server_version = "fgr-serve"
      # Each connection holds a pool thread: bound how long a slow or idle
      # client may keep one (reading a request, or between keep-alives).
      timeout = max(1.0, timeout_ms / 1000) if timeout_ms > 0 else 30.0

      def _reply(self, status: int, payload: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if enable_cors:
          self.send_header("Access-Control-Allow-Origin", "*")
          self.send_header("Access-Control-Allow-Methods", "POST, GET")
          self.send_header("Access-Control-Allow-Headers", "Content-Type")
        self.end_headers()
        if self.command != "HEAD":  # A HEAD reply has the headers of the body it leaves out.
          self.wfile.write(payload)

      def _handle(self, method: str):
        path = urllib.parse.urlsplit(self.path).path
        if method == "GET" and prometheus_path and path == prometheus_path:
          self._reply(200, metrics.exposition(), metrics_lib.CONTENT_TYPE)
          return
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        try:
          length = 0 if chunked else int(self.headers.get("Content-Length") or 0)
        except ValueError:
          length = -1
        if length < 0:
          self.close_connection = True  # The body's end is unknown.
          self._reply(400, b'{"error": "Invalid Content-Length"}', "application/json")
          return
        try:
          if max_body_bytes and length > max_body_bytes:
            raise _BodyTooLarge(length)
          if chunked:
            body = _read_chunked(self.rfile, max_body_bytes)
          else:
            body = self.rfile.read(length) if length > 0 else b""
        except _BodyTooLarge as e:
          # 413, not TF Serving's 429 for RESOURCE_EXHAUSTED: the request
          # itself is too large and retrying it can't succeed. The body is
          # not read to its end, so the connection can't be reused.
          self.close_connection = True
          message = (
            f"Request body of {e.size} bytes exceeds the limit of {max_body_bytes} bytes (--rest_api_max_body_bytes)"
          )
          self._reply(413, json.dumps({"error": message}).encode(), "application/json")
          return
        except ValueError as e:
          self.close_connection = True
          self._reply(400, json.dumps({"error": f"Invalid chunked request body: {e}"}).encode(), "application/json")
          return
        if not path.lower().startswith("/v1/"):
          status, payload = 404, {"error": f"Not found: {method} {path}"}
        else:
          status, payload = rest.handle(method, path, body)
        try:
          data = json.dumps(payload, indent=None).encode("utf-8")
        except (TypeError, ValueError) as e:  # A value JSON can't hold.
          status = 500
          data = json.dumps({"error": f"Failed to write JSON: {e}"}).encode()
        self._reply(status, data, "application/json")

      # As in TF Serving, every method reaches the API, which answers what it does not serve with
      # 400 "Malformed request" (http.server's default is an HTML 501 page).
      def do_GET(self):
        self._handle("GET")

      def do_POST(self):
        self._handle("POST")

      def do_PUT(self):
        self._handle("PUT")

      def do_DELETE(self):
        self._handle("DELETE")

      def do_PATCH(self):
        self._handle("PATCH")

      def do_HEAD(self):
        self._handle("HEAD")

      def do_OPTIONS(self):
        """A CORS preflight: OK when it names an http(s) Origin, else 400, with an empty body either way
        (TF Serving's http_server.cc)."""
        self._reply(200 if _HTTP_ORIGIN.search(self.headers.get("Origin", "")) else 400, b"", "text/plain")

      def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        logging.debug("REST %s - %s", self.address_string(), format % args)

    self._server = _PooledHTTPServer((host, port), Handler, num_threads)
    self.port = self._server.server_address[1]
    self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    """Stops accepting, then waits for requests being handled."""
    self._server.shutdown()
    self._server.server_close()
