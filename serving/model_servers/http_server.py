"""REST front end: TF Serving's /v1/models API and the Prometheus endpoint.

Built on the standard library's http.server and selectors: the API is small
JSON over HTTP/1.x. One event loop reads every connection and hands only
complete requests to a fixed worker pool (TF Serving's --rest_api_num_threads),
as TF Serving's libevent front end does, so slow or idle clients hold no
worker. No web framework dependency is needed.
"""

import concurrent.futures
import http.client
import http.server
import io
import json
import re
import selectors
import socket
import threading
import time
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


# The request line and headers one request may send before the blank line (431 beyond it).
MAX_HEADER_BYTES = 64 * 1024
_HEADER_END = re.compile(rb"\n\r?\n")


class _HeadersTooLarge(Exception):
  pass


class _RequestFramer:
  """Finds where the first HTTP/1.x request in a connection's buffer ends, as the bytes arrive.

  A request is handed to a worker only once it is complete, or once what arrived is enough for the
  handler to answer it without reading more: a Content-Length over the body limit (413) or that
  isn't a number (400), a malformed or oversized chunk (400, 413). The handler then reads exactly
  those bytes, so it never waits on the client. The framing follows the handler's own reading
  (http.server's headers, `_read_chunked`).
  """

  def __init__(self, max_body_bytes: int):
    self._limit = max_body_bytes
    self.reset()

  def reset(self) -> None:
    self._scanned = 0  # Where the search for the headers' end resumes.
    self.header_end: int | None = None
    self.expect_continue = False
    self._body_end: int | None = None
    self._chunk_pos: int | None = None  # The next chunk size line (chunked bodies).
    self._chunk_total = 0
    self._trailers = False

  def end(self, buf: bytearray) -> int | None:
    """The length of the first request in `buf` (or of the part the handler needs), None if more
    must arrive first.

    Raises:
      _HeadersTooLarge: the request line and headers pass MAX_HEADER_BYTES.
    """
    if self.header_end is None:
      if buf[:2] == b"\r\n" or buf[:1] == b"\n":  # An empty request line: the handler closes.
        return 2 if buf[:1] == b"\r" else 1
      match = _HEADER_END.search(buf, max(0, self._scanned - 3))
      if not match:
        self._scanned = len(buf)
        if len(buf) > MAX_HEADER_BYTES:
          raise _HeadersTooLarge()
        return None
      self.header_end = match.end()
      if self.header_end > MAX_HEADER_BYTES:
        raise _HeadersTooLarge()
      if self._frame_body(bytes(buf[: self.header_end])):
        self._body_end = self.header_end  # The handler answers without reading a body.
    if self._body_end is not None:
      return self._body_end if len(buf) >= self._body_end else None
    self._body_end = self._chunked_end(buf)
    return self._body_end

  def _frame_body(self, head: bytes) -> bool:
    """Reads the headers; True when the handler can answer from them alone."""
    request_line, _, fields = head.partition(b"\n")
    try:
      headers = http.client.parse_headers(io.BytesIO(fields))
    except http.client.HTTPException:  # Too many or too long: the handler answers 431.
      return True
    version = request_line.split()[-1:]
    self.expect_continue = (
      headers.get("Expect", "").lower() == "100-continue"
      and bool(version)
      and version[0] not in (b"HTTP/1.0", b"HTTP/0.9")
    )
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
      self._chunk_pos = self.header_end
      return False
    try:
      length = int(headers.get("Content-Length") or 0)
    except ValueError:
      return True
    if length < 0 or (self._limit and length > self._limit):
      return True
    self._body_end = self.header_end + length
    return False

  def _chunked_end(self, buf: bytearray) -> int | None:
    while True:
      pos = self._chunk_pos
      limit = 8192 if self._trailers else 1024  # `_read_chunked`'s readline limits.
      newline = buf.find(b"\n", pos, pos + limit)
      if newline < 0:
        return pos + limit if len(buf) >= pos + limit else None  # Too long: the handler refuses it.
      line = bytes(buf[pos : newline + 1])
      if self._trailers:
        self._chunk_pos = newline + 1
        if line in (b"\r\n", b"\n"):
          return newline + 1
        continue
      try:
        size = int(line.split(b";", 1)[0].strip(), 16)
      except ValueError:
        return newline + 1
      if size < 0:
        return newline + 1
      if size == 0:
        self._trailers = True
        self._chunk_pos = newline + 1
        continue
      self._chunk_total += size
      if self._limit and self._chunk_total > self._limit:
        return newline + 1
      data_end = newline + 1 + size + 2
      if len(buf) < data_end:
        self._chunk_total -= size  # Counted again when the rest arrives.
        return None
      self._chunk_pos = data_end
      if buf[data_end - 2 : data_end] != b"\r\n":
        return data_end


class _Connection:
  """A client connection between requests: what it has sent so far and until when it may send it."""

  def __init__(self, sock: socket.socket, address, max_body_bytes: int):
    self.sock = sock
    self.address = address
    self.buf = bytearray()
    self.framer = _RequestFramer(max_body_bytes)
    self.deadline = 0.0


class _SocketWriter(io.BufferedIOBase):
  """The handler's wfile: each write goes out whole (under the socket's timeout)."""

  def __init__(self, sock: socket.socket):
    super().__init__()
    self._sock = sock

  def writable(self) -> bool:
    return True

  def write(self, data) -> int:
    self._sock.sendall(data)
    return len(data)


class _PooledHTTPServer(http.server.HTTPServer):
  """An HTTP server that reads requests on one event loop and hands only complete ones to a fixed
  thread pool (--rest_api_num_threads), as TF Serving's libevent front end does.

  A connection holds a worker only while its request runs: an idle keep-alive connection, or a
  client sending its request slowly or not at all, costs a file descriptor and its buffer. Each
  request must arrive whole within `idle_timeout` seconds of the connection opening or its previous
  answer (--rest_api_timeout_in_ms); the connection is closed otherwise.
  """

  # socketserver listens with a backlog of 5: under a burst of new connections the kernel then
  # drops or resets them before the pool sees them.
  request_queue_size = socket.SOMAXCONN

  def __init__(self, address, handler, num_threads: int, idle_timeout: float = 30.0, max_body_bytes: int = 0):
    if ":" in address[0]:  # IPv6, e.g. --host=[::]
      self.address_family = socket.AF_INET6
      address = (address[0].strip("[]"), address[1])
    super().__init__(address, handler)
    self.idle_timeout = idle_timeout
    self._max_body_bytes = max_body_bytes
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="http")
    self._selector = selectors.DefaultSelector()
    self._wake_r, self._wake_w = socket.socketpair()
    self._wake_r.setblocking(False)
    self._wake_w.setblocking(False)
    self._lock = threading.Lock()
    self._returned: list[_Connection] = []  # Back from a worker, to wait for their next request.
    self._idle: set[_Connection] = set()
    self.stopping = False
    self._loop_closed = False
    self._loop_done = threading.Event()
    self._loop_done.set()

  def serve_forever(self, poll_interval: float = 0.5) -> None:
    """Reads connections until `shutdown`; then closes those not in a worker's hands."""
    del poll_interval  # The loop wakes for its deadlines and for `shutdown`.
    self._loop_done.clear()
    self.socket.setblocking(False)
    self._selector.register(self.socket, selectors.EVENT_READ, None)
    self._selector.register(self._wake_r, selectors.EVENT_READ, None)
    next_sweep = time.monotonic() + self.idle_timeout
    try:
      while not self.stopping:
        now = time.monotonic()
        if now >= next_sweep:
          for conn in [c for c in self._idle if c.deadline <= now]:
            self._close(conn)  # Idle or half-sent for too long.
          # Later connections' deadlines come later still.
          next_sweep = min((c.deadline for c in self._idle), default=now + self.idle_timeout)
        for key, _ in self._selector.select(max(0.0, next_sweep - now)):
          if key.fileobj is self.socket:
            self._accept()
          elif key.fileobj is self._wake_r:
            self._take_returned()
          else:
            self._read(key.data)
    finally:
      with self._lock:
        self._loop_closed = True
        returned, self._returned = self._returned, []
      for conn in list(self._idle) + returned:
        self._close(conn)
      self._selector.close()
      self._loop_done.set()

  def shutdown(self) -> None:
    self.stopping = True
    self._wake()
    self._loop_done.wait()

  def _wake(self) -> None:
    try:
      self._wake_w.send(b"x")
    except OSError:  # Full (the loop will wake anyway) or closed.
      pass

  def _accept(self) -> None:
    while True:
      try:
        sock, address = self.socket.accept()
      except (BlockingIOError, InterruptedError):
        return
      except OSError as e:  # E.g. out of file descriptors: try again on the next wake.
        logging.warning("REST accept failed: %s", e)
        return
      sock.setblocking(False)
      conn = _Connection(sock, address, self._max_body_bytes)
      conn.deadline = time.monotonic() + self.idle_timeout
      self._idle.add(conn)
      self._selector.register(sock, selectors.EVENT_READ, conn)

  def _take_returned(self) -> None:
    try:
      while self._wake_r.recv(4096):
        pass
    except (BlockingIOError, InterruptedError):
      pass
    with self._lock:
      returned, self._returned = self._returned, []
    for conn in returned:
      conn.deadline = time.monotonic() + self.idle_timeout
      self._idle.add(conn)
      self._selector.register(conn.sock, selectors.EVENT_READ, conn)
      if conn.buf:  # A pipelined request may already be here.
        self._dispatch_if_complete(conn)

  def _read(self, conn: _Connection) -> None:
    try:
      data = conn.sock.recv(65536)
    except (BlockingIOError, InterruptedError):
      return
    except OSError:
      data = b""
    if not data:  # The client closed (or reset) the connection.
      self._close(conn)
      return
    conn.buf += data
    self._dispatch_if_complete(conn)

  def _dispatch_if_complete(self, conn: _Connection) -> None:
    try:
      end = conn.framer.end(conn.buf)
    except _HeadersTooLarge:
      self._selector.unregister(conn.sock)
      self._idle.discard(conn)
      self._pool.submit(self._refuse_headers, conn)
      return
    if end is None:
      if conn.framer.expect_continue:  # The client waits for this before sending its body.
        conn.framer.expect_continue = False
        try:
          conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        except OSError:
          pass
      return
    request, conn.buf = bytes(conn.buf[:end]), conn.buf[end:]
    conn.framer.reset()
    self._selector.unregister(conn.sock)
    self._idle.discard(conn)
    self._pool.submit(self._process, conn, request)

  def _refuse_headers(self, conn: _Connection) -> None:
    body = json.dumps({"error": f"Request line and headers exceed {MAX_HEADER_BYTES} bytes"}).encode()
    try:
      conn.sock.settimeout(self.idle_timeout)
      conn.sock.sendall(
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
      )
    except OSError:
      pass
    self._close(conn)

  def _process(self, conn: _Connection, request: bytes) -> None:
    keep = False
    try:
      conn.sock.settimeout(self.idle_timeout)  # Bounds writing the answer to a slow reader.
      handler = self.RequestHandlerClass((conn.sock, request), conn.address, self)
      keep = not handler.close_connection and not self.stopping
    except OSError as e:  # The client went away mid-answer.
      logging.debug("REST %s: %s", conn.address, e)
    except Exception:  # http.server's own convention for handler errors.
      self.handle_error(conn.sock, conn.address)
    if not keep:
      self._close(conn)
      return
    conn.sock.setblocking(False)
    with self._lock:
      if not self._loop_closed:
        self._returned.append(conn)
        conn = None
    if conn is not None:  # Stopped meanwhile.
      self._close(conn)
    else:
      self._wake()

  def _close(self, conn: _Connection) -> None:
    if conn in self._idle:
      self._idle.discard(conn)
      try:
        self._selector.unregister(conn.sock)
      except (KeyError, ValueError):
        pass
    self.shutdown_request(conn.sock)

  def server_close(self):
    super().server_close()
    self._pool.shutdown(wait=True)  # Drain in-flight requests.
    self._wake_r.close()
    self._wake_w.close()


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
      protocol_version = "HTTP/1.1"  # Keep-alive: idle connections wait in the event loop, not here.

      def setup(self):
        # The server read this whole request before handing it over: the handler never waits on
        # the client to send.
        self.connection, data = self.request
        self.rfile = io.BytesIO(data)
        self.wfile = _SocketWriter(self.connection)

      def handle(self):
        self.handle_one_request()  # The event loop waits for the connection's next request.

      def handle_expect_100(self):
        return True  # The event loop answered 100 Continue before it read the body.

      def _reply(self, status: int, payload: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection or self.server.stopping:
          self.send_header("Connection", "close")  # Draining, or the body was left unread.
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

    self._server = _PooledHTTPServer(
      (host, port),
      Handler,
      num_threads,
      idle_timeout=max(1.0, timeout_ms / 1000) if timeout_ms > 0 else 30.0,
      max_body_bytes=max_body_bytes,
    )
    self.port = self._server.server_address[1]
    self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    """Stops accepting and closes connections between requests (idle or still sending), then
    waits for the requests being handled; their answers close their connections."""
    self._server.shutdown()
    self._server.server_close()
