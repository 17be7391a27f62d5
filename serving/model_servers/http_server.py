"""REST front end: TF Serving's /v1/models API and the Prometheus endpoint.

Built on the standard library's http.server and selectors: the API is small
JSON over HTTP/1.x. One event loop reads every connection and hands only
complete requests (framed by http_framing) to a fixed worker pool (TF Serving's --rest_api_num_threads),
as TF Serving's libevent front end does, so slow or idle clients hold no
worker. No web framework dependency is needed.
"""

import concurrent.futures
import http
import http.client
import http.server
import io
import json
import math
import re
import resource
import selectors
import socket
import threading
import time
import urllib.parse
import zlib
from typing import Any

from absl import logging
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
  classification_pb2,
  get_model_metadata_pb2,
  get_model_status_pb2,
  model_pb2,
  predict_pb2,
  regression_pb2,
)

from serving import errors
from serving.model_servers import http_framing, service_impl
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
# A number with an exponent of three or more digits: only those can overflow a double (1e400), which
# json's parser would make inf where TF Serving's (RapidJSON) refuses the number.
_LONG_EXPONENT = re.compile(rb"[0-9][eE][+-]?[0-9]{3}")


def _finite_double(text: str) -> float:
  value = float(text)
  if math.isinf(value):
    raise ValueError(f"Number too big to be stored in double: {text}")
  return value


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


# TF Serving's bound on an inflated gzip request body (net_http ZLib::kMaxUncompressedBytes), ours
# without --rest_api_max_body_bytes.
MAX_GUNZIPPED_BYTES = 100 << 20


def _gunzip(body: bytes, limit: int) -> bytes:
  """A `Content-Encoding: gzip` request body inflated, as TF Serving's HTTP server inflates one.

  Args:
    body: The body as sent.
    limit: The most bytes it may inflate to (--rest_api_max_body_bytes; 0: MAX_GUNZIPPED_BYTES).

  Raises:
    ServingError: INVALID_ARGUMENT (400) if it is not gzip; RESOURCE_EXHAUSTED, HTTP 413 as a body
      over the limit sent plain, once it inflates past `limit`: it stops there, so a small body of
      zeros cannot make the server hold gigabytes.
  """
  limit = limit if limit > 0 else MAX_GUNZIPPED_BYTES
  inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
  try:
    data = inflater.decompress(body, limit + 1)
  except zlib.error as e:
    raise errors.invalid_argument(f"Unable to decompress the gzip request body: {e}") from e
  if len(data) > limit:
    raise errors.resource_exhausted(
      f"Request body exceeds the limit of {limit} bytes (--rest_api_max_body_bytes) once decompressed", 413
    )
  if not inflater.eof:
    raise errors.invalid_argument("Unable to decompress the gzip request body: it ends before its gzip stream does")
  return data


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
      error = errors.answered(e)  # Without its traceback: the request is freed once answered.
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
      # utf-8-sig: a byte order mark before the body is skipped, as TF Serving's parser skips it.
      text = body.decode("utf-8-sig")
      # The finite check only where an overflow can be: a hook on every number slows big bodies.
      request = json.loads(text, parse_float=_finite_double) if _LONG_EXPONENT.search(body) else json.loads(text)
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
        dtype = signature.inputs[alias].dtype
        # Numbers as tensor_content, one copy of their bytes; strings in string_val, which decodes
        # without the varint pass of their tensor_content form.
        request.inputs[alias].CopyFrom(
          tensor_util.to_tensor_proto(array, dtype, as_tensor_content=dtype != types_pb2.DT_STRING)
        )
      return request

    # One servable for the signature, the limits and the run (and admission
    # and metrics), as a gRPC Predict has.
    response = self._api.predict_built(spec, build, self._timeout_ms, "REST")
    outputs = {a: tensor_util.to_ndarray(t, a) for a, t in response.outputs.items()}
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


# --rest_api_max_buffered_bytes's derived default: this many times --rest_api_max_body_bytes, and at
# least DEFAULT_MIN_BUFFERED_BYTES, so several requests of the largest size can arrive at once.
BUFFERED_BODIES = 4
DEFAULT_MIN_BUFFERED_BYTES = 256 << 20
# After a failed accept (out of file descriptors), the listening socket is ignored this long: it stays
# readable, and retrying at once would spin the event loop (asyncio waits the same).
_ACCEPT_RETRY_SECONDS = 1.0
# A connection closed after an answer with the client possibly still sending has its input read and
# dropped for at most this long first: closing a socket with unread input resets the connection, and
# the client may then lose the answer before reading it.
_LINGER_SECONDS = 2.0
# Failed accepts and shed connections are logged at most once per this many seconds.
_WARNING_INTERVAL_SECONDS = 10.0


def default_max_connections() -> int:
  """--rest_api_max_connections's derived default: half the process's open-file limit
  (RLIMIT_NOFILE), leaving the rest to gRPC, model files and TensorFlow."""
  soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
  if soft == resource.RLIM_INFINITY or soft <= 0:
    return 1 << 16
  return max(1, soft // 2)


def _error_response(status: int, message: str) -> bytes:
  """A whole `{"error": ...}` answer that closes the connection, for refusals made before a handler runs."""
  body = json.dumps({"error": message}).encode()
  return (
    f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
  ).encode() + body


class _Connection:
  """A client connection: what it has sent so far and until when it may send it."""

  def __init__(self, sock: socket.socket, address, max_body_bytes: int):
    self.sock = sock
    self.address = address
    self.buf = bytearray()
    self.framer = http_framing.RequestFramer(max_body_bytes)
    self.deadline = 0.0
    self.held = 0  # Request bytes counted toward the server's --rest_api_max_buffered_bytes.
    self.closing = False  # Answered for the last time: its input is read and dropped, then it closes.


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

  Both costs are bounded. At `max_connections` open connections, a new one replaces the connection
  that has waited longest in the event loop (or is refused 503 when every connection is in a
  worker's hands). Request bytes read but not yet answered, summed over all connections, stay within
  `max_buffered_bytes`: a request that would take the sum past it is refused 429 (TF Serving's status
  for RESOURCE_EXHAUSTED), as soon as its Content-Length shows it or its bytes do.

  Args:
    address: (host, port) to bind.
    handler: The request handler class; it is given (socket, http_framing.Framed).
    num_threads: Worker threads.
    idle_timeout: Seconds a request may take to arrive.
    max_body_bytes: Largest request body; 0: no limit.
    max_connections: Most open connections; 0: no limit.
    max_buffered_bytes: Most request bytes held at once; 0: no limit.
  """

  # socketserver listens with a backlog of 5: under a burst of new connections the kernel then
  # drops or resets them before the pool sees them.
  request_queue_size = socket.SOMAXCONN

  def __init__(
    self,
    address,
    handler,
    num_threads: int,
    idle_timeout: float = 30.0,
    max_body_bytes: int = 0,
    max_connections: int = 0,
    max_buffered_bytes: int = 0,
  ):
    if ":" in address[0]:  # IPv6, e.g. --host=[::]
      self.address_family = socket.AF_INET6
      address = (address[0].strip("[]"), address[1])
    # Before the bind: a bind that fails (the port in use) calls server_close, which closes these.
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="http")
    self._wake_r, self._wake_w = socket.socketpair()
    try:
      super().__init__(address, handler)
    except OSError as e:
      raise OSError(
        e.errno, f"cannot serve REST at {address[0]}:{address[1]} (--rest_api_port): {e.strerror}"
      ) from None
    self.idle_timeout = idle_timeout
    self._max_body_bytes = max_body_bytes
    self._max_connections = max_connections
    self._max_buffered = max_buffered_bytes
    self._selector = selectors.DefaultSelector()
    self._wake_r.setblocking(False)
    self._wake_w.setblocking(False)
    self._lock = threading.Lock()
    self._returned: list[_Connection] = []  # Back from a worker, to wait for their next request.
    # Connections in the event loop, by when they entered it (so by deadline): waiting for a request,
    # and closing.
    self._idle: dict[_Connection, None] = {}
    self._closing: dict[_Connection, None] = {}
    self._open = 0  # Connections open, in the loop or in a worker's hands (under _lock).
    self._buffered = 0  # Request bytes read and not yet answered (under _lock).
    self._accept_resumes: float | None = None  # Set while accepting backs off.
    self._discard = bytearray(65536)  # Where closing connections' input is read to be dropped.
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
    try:
      while not self.stopping:
        for key, _ in self._selector.select(self._expire(time.monotonic())):
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
      for conn in list(self._idle) + list(self._closing) + returned:
        self._drop(conn)
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

  def _expire(self, now: float) -> float:
    """Closes the connections past their deadline and resumes accepting after a back-off; returns
    the seconds until the next deadline."""
    for waiting in (self._idle, self._closing):
      while waiting:
        conn = next(iter(waiting))
        if conn.deadline > now:
          break
        self._drop(conn)  # Idle, half-sent or closing for too long.
    if self._accept_resumes is not None and self._accept_resumes <= now:
      self._accept_resumes = None
      self._selector.register(self.socket, selectors.EVENT_READ, None)
    deadlines = [next(iter(waiting)).deadline for waiting in (self._idle, self._closing) if waiting]
    if self._accept_resumes is not None:
      deadlines.append(self._accept_resumes)
    return max(0.0, min(deadlines, default=now + self.idle_timeout) - now)

  def _accept(self) -> None:
    while True:
      try:
        sock, address = self.socket.accept()
      except (BlockingIOError, InterruptedError):
        return
      except ConnectionAbortedError:  # Reset by the client while in the backlog.
        continue
      except OSError as e:  # E.g. out of file descriptors (EMFILE, ENFILE).
        self._selector.unregister(self.socket)
        self._accept_resumes = time.monotonic() + _ACCEPT_RETRY_SECONDS
        logging.log_every_n_seconds(
          logging.WARNING,
          "REST accept failed: %s; not accepting for %.1f s",
          _WARNING_INTERVAL_SECONDS,
          e,
          _ACCEPT_RETRY_SECONDS,
        )
        return
      with self._lock:
        self._open += 1
        full = self._max_connections and self._open > self._max_connections
      if full and not self._shed():
        self._refuse_new(sock)
        continue
      try:
        # Each answer is one write; without this, a kept-alive connection's next answer would wait
        # for the client's delayed ACK of the previous one (Nagle).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      except OSError:
        pass
      sock.setblocking(False)
      conn = _Connection(sock, address, self._max_body_bytes)
      conn.deadline = time.monotonic() + self.idle_timeout
      self._idle[conn] = None
      self._selector.register(sock, selectors.EVENT_READ, conn)

  def _shed(self) -> bool:
    """Closes the connection that has waited longest in the event loop, closing ones first, to make
    room for a new one; False if every connection is in a worker's hands."""
    waiting = self._closing or self._idle
    if not waiting:
      return False
    logging.log_every_n_seconds(
      logging.WARNING,
      "REST connections at the limit of %d (--rest_api_max_connections): closing the longest waiting",
      _WARNING_INTERVAL_SECONDS,
      self._max_connections,
    )
    self._drop(next(iter(waiting)))
    return True

  def _refuse_new(self, sock: socket.socket) -> None:
    message = (
      f"The server has {self._max_connections} REST connections open (--rest_api_max_connections), "
      "all with requests being handled; retry later"
    )
    try:
      sock.setblocking(False)
      sock.send(_error_response(errors.unavailable(message).http_status, message))
    except OSError:
      pass
    sock.close()
    with self._lock:
      self._open -= 1

  def _take_returned(self) -> None:
    try:
      while self._wake_r.recv(4096):
        pass
    except (BlockingIOError, InterruptedError):
      pass
    with self._lock:
      returned, self._returned = self._returned, []
    for conn in returned:
      if conn.closing:
        self._start_closing(conn)
        continue
      conn.deadline = time.monotonic() + self.idle_timeout
      self._idle[conn] = None
      self._selector.register(conn.sock, selectors.EVENT_READ, conn)
      if conn.buf:  # A pipelined request may already be here.
        self._dispatch_if_complete(conn)

  def _read(self, conn: _Connection) -> None:
    if conn.closing:
      try:
        more = conn.sock.recv_into(self._discard)
      except (BlockingIOError, InterruptedError):
        return
      except OSError:
        more = 0
      if not more:
        self._drop(conn)
      return
    try:
      data = conn.sock.recv(65536)
    except (BlockingIOError, InterruptedError):
      return
    except OSError:
      data = b""
    if not data:  # The client closed (or reset) the connection.
      self._drop(conn)
      return
    conn.buf += data
    self._hold(conn, len(data))
    self._dispatch_if_complete(conn)

  def _dispatch_if_complete(self, conn: _Connection) -> None:
    try:
      end = conn.framer.end(conn.buf)
    except http_framing.HeadersTooLarge:
      self._refuse(conn, 431, f"Request line and headers exceed {http_framing.MAX_HEADER_BYTES} bytes")
      return
    if end is None:
      # Counted as it will be once whole when its Content-Length is known, else as it is so far.
      needed = max(len(conn.buf), conn.framer.body_end or 0)
      if self._max_buffered and self._buffered - conn.held + needed > self._max_buffered:
        message = (
          f"REST requests being received would hold more than {self._max_buffered} bytes "
          "(--rest_api_max_buffered_bytes); retry later"
        )
        self._refuse(conn, errors.resource_exhausted(message).http_status, message)
      elif conn.framer.expect_continue:  # The client waits for this before sending its body.
        conn.framer.expect_continue = False
        try:
          conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        except OSError:
          pass
      return
    framed = conn.framer.take(conn.buf)
    conn.buf = conn.buf[end:]
    conn.framer.reset()
    self._selector.unregister(conn.sock)
    del self._idle[conn]
    self._pool.submit(self._process, conn, framed, end)

  def _refuse(self, conn: _Connection, status: int, message: str) -> None:
    """Answers a connection in the event loop with an error, then closes it."""
    try:
      conn.sock.send(_error_response(status, message))
    except OSError:
      pass
    self._start_closing(conn)

  def _start_closing(self, conn: _Connection) -> None:
    """Ends the answers on `conn`, then reads and drops its input until the client closes it or
    _LINGER_SECONDS pass (see there)."""
    conn.closing = True
    self._release(conn, conn.held)
    conn.buf = bytearray()
    try:
      conn.sock.shutdown(socket.SHUT_WR)
    except OSError:  # Already reset.
      self._drop(conn)
      return
    if self._idle.pop(conn, 0) is not None:
      self._selector.register(conn.sock, selectors.EVENT_READ, conn)
    conn.deadline = time.monotonic() + min(_LINGER_SECONDS, self.idle_timeout)
    self._closing[conn] = None

  def _process(self, conn: _Connection, framed: http_framing.Framed, size: int) -> None:
    keep = gone = False
    try:
      conn.sock.settimeout(self.idle_timeout)  # Bounds writing the answer to a slow reader.
      handler = self.RequestHandlerClass((conn.sock, framed), conn.address, self)
      keep = not handler.close_connection and not self.stopping
    except OSError as e:  # The client went away mid-answer.
      logging.debug("REST %s: %s", conn.address, e)
      gone = True
    except Exception:  # http.server's own convention for handler errors.
      self.handle_error(conn.sock, conn.address)
    self._release(conn, size)
    # A body left unread, or bytes sent after the last request, mean the client may still be sending.
    conn.closing = not (keep or gone) and (framed.error is not None or bool(conn.buf))
    if not keep and not conn.closing:
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

  def _hold(self, conn: _Connection, size: int) -> None:
    conn.held += size
    with self._lock:
      self._buffered += size

  def _release(self, conn: _Connection, size: int) -> None:
    conn.held -= size
    with self._lock:
      self._buffered -= size

  def _drop(self, conn: _Connection) -> None:
    """Closes a connection in the event loop."""
    self._idle.pop(conn, None)
    self._closing.pop(conn, None)
    try:
      self._selector.unregister(conn.sock)
    except (KeyError, ValueError):
      pass
    self._close(conn)

  def _close(self, conn: _Connection) -> None:
    """Closes a connection no longer in the event loop (any thread)."""
    self.shutdown_request(conn.sock)
    self._release(conn, conn.held)
    conn.buf = bytearray()
    with self._lock:
      self._open -= 1

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
    max_connections: Most open REST connections (--rest_api_max_connections);
      0: `default_max_connections()`, < 0: no limit.
    max_buffered_bytes: Most request bytes read and not yet answered, over all
      connections (--rest_api_max_buffered_bytes); 0: BUFFERED_BODIES times
      `max_body_bytes` and at least DEFAULT_MIN_BUFFERED_BYTES, < 0: no limit.
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
    max_connections: int = 0,
    max_buffered_bytes: int = 0,
  ):
    rest = RestApi(api, timeout_ms)
    metrics = api.metrics
    if max_connections == 0:
      max_connections = default_max_connections()
    if max_buffered_bytes == 0:
      max_buffered_bytes = max(DEFAULT_MIN_BUFFERED_BYTES, BUFFERED_BODIES * max_body_bytes)

    class Handler(http.server.BaseHTTPRequestHandler):
      """Routes one HTTP request."""

      server_version = "fgr-serve"
      protocol_version = "HTTP/1.1"  # Keep-alive: idle connections wait in the event loop, not here.
      # Errors found before the request line's version is read still answer with a status line.
      default_request_version = "HTTP/1.0"

      def setup(self):
        # The server read this whole request before handing it over: the handler never waits on
        # the client to send.
        self.connection, self.framed = self.request
        self.rfile = io.BytesIO(self.framed.head)
        self.wfile = _SocketWriter(self.connection)

      def handle(self):
        self.handle_one_request()  # The event loop waits for the connection's next request.

      def handle_expect_100(self):
        return True  # The event loop answered 100 Continue before it read the body.

      def parse_request(self) -> bool:
        """http.server's parse, refusing HTTP/0.x and the body framing the event loop found bad."""
        if len(self.raw_requestline.split()) == 2:  # "GET /path": HTTP/0.9, which http.server serves.
          self.command, self.request_version = None, self.default_request_version
          self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
          self.send_error(400, "Bad request line: no HTTP version (HTTP/0.9 is not supported)")
          return False
        if not super().parse_request():
          return False
        if self.request_version.startswith("HTTP/0."):  # http.server checked it is HTTP/<int>.<int>.
          self.send_error(505, f"Unsupported HTTP version ({self.request_version})")
          return False
        if self.framed.error is not None:
          self.send_error(*self.framed.error)
          return False
        if self.framed.close:
          self.close_connection = True
        return True

      def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """An HTTP-level error (bad request line or headers, unsupported version or method, bad
        framing), answered like every other error: `{"error": ...}`, then the connection closes."""
        del explain
        if self.request_version.startswith("HTTP/0."):  # http.server would write no status line or headers.
          self.request_version = self.default_request_version
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        payload = json.dumps({"error": message or http.HTTPStatus(code).phrase}).encode()
        self._reply(code, payload, "application/json")

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
        # The status line, headers and body in one write: a body written apart would wait for the
        # client's delayed ACK of the headers on a kept-alive connection.
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":  # A HEAD reply has the headers of the body it leaves out.
          self._headers_buffer.append(payload)
        self.flush_headers()

      def _handle(self, method: str):
        path = urllib.parse.urlsplit(self.path).path
        if method == "GET" and prometheus_path and path == prometheus_path:
          self._reply(200, metrics.exposition(), metrics_lib.CONTENT_TYPE)
          return
        if not path.lower().startswith("/v1/"):
          status, payload = 404, {"error": f"Not found: {method} {path}"}
        else:
          status, payload = self._api_answer(method, path)
        try:
          data = json.dumps(payload, indent=None).encode("utf-8")
        except (TypeError, ValueError) as e:  # A value JSON can't hold.
          status = 500
          data = json.dumps({"error": f"Failed to write JSON: {e}"}).encode()
        self._reply(status, data, "application/json")

      def _api_answer(self, method: str, path: str) -> tuple[int, Any]:
        body = self.framed.body
        # TF Serving's test: the word anywhere in the header, and a body to inflate (only a POST's
        # is read: a GET's, inflated or not, is ignored).
        if method == "POST" and body and "gzip" in self.headers.get("Content-Encoding", ""):
          try:
            body = _gunzip(body, max_body_bytes)
          except errors.ServingError as e:
            return e.http_status, {"error": e.message}
        return rest.handle(method, path, body)

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
      max_connections=max(0, max_connections),
      max_buffered_bytes=max(0, max_buffered_bytes),
    )
    logging.info(
      "REST limits: %s connections, %s bytes of requests being received",
      max_connections if max_connections > 0 else "unlimited",
      max_buffered_bytes if max_buffered_bytes > 0 else "unlimited",
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
