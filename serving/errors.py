"""Serving errors carrying TF Serving's canonical status codes."""

import grpc
from tensorflow_serving.apis import status_pb2

# TF Serving maps canonical codes to HTTP codes this way
# (tensorflow_serving/util/net_http ... ToHTTPStatusCode).
_HTTP_STATUS = {
  grpc.StatusCode.OK: 200,
  grpc.StatusCode.CANCELLED: 500,
  grpc.StatusCode.UNKNOWN: 500,
  grpc.StatusCode.INVALID_ARGUMENT: 400,
  grpc.StatusCode.DEADLINE_EXCEEDED: 504,
  grpc.StatusCode.NOT_FOUND: 404,
  grpc.StatusCode.ALREADY_EXISTS: 409,
  grpc.StatusCode.PERMISSION_DENIED: 403,
  grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
  grpc.StatusCode.FAILED_PRECONDITION: 400,
  grpc.StatusCode.ABORTED: 409,
  grpc.StatusCode.OUT_OF_RANGE: 400,
  grpc.StatusCode.UNIMPLEMENTED: 501,
  grpc.StatusCode.INTERNAL: 500,
  grpc.StatusCode.UNAVAILABLE: 503,
  grpc.StatusCode.DATA_LOSS: 500,
  grpc.StatusCode.UNAUTHENTICATED: 401,
}

_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

# The most bytes (UTF-8) of a status message sent in gRPC trailers. Messages echo what the client sent
# (names, aliases); gRPC refuses trailers over 16 KiB (a message goes percent-encoded, up to 3 bytes a
# byte), and the client would then see RESOURCE_EXHAUSTED instead of the error's own code. The native
# server caps at the same length (serving/native/cc/call.h).
MAX_STATUS_MESSAGE = 2048


def status_message(message: str) -> str:
  """`message` as sent in a gRPC status: cut to MAX_STATUS_MESSAGE bytes of whole characters, saying so."""
  data = message.encode("utf-8", errors="replace")
  if len(data) <= MAX_STATUS_MESSAGE:
    return message
  kept = data[:MAX_STATUS_MESSAGE].decode("utf-8", errors="ignore")
  return f"{kept}... ({len(data) - len(kept.encode('utf-8'))} more bytes)"


class ServingError(Exception):
  """An error returned to the client with a canonical status code.

  Args:
    code: The gRPC status code (TF Serving's canonical error space).
    message: Human-readable message; names model, version and signature
      whenever they are known.
    http_status: The REST status, if not TF Serving's for `code`.
  """

  def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None):
    super().__init__(message)
    self.code = code
    self.message = message
    self._http_status = http_status

  @property
  def http_status(self) -> int:
    """The HTTP status the REST API answers with for this error: TF
    Serving's for the code, unless the error chose its own."""
    return self._http_status or _HTTP_STATUS.get(self.code, 500)

  def to_status_proto(self) -> status_pb2.StatusProto:
    """Returns the error as a `tensorflow.serving.StatusProto`."""
    return status_pb2.StatusProto(error_code=self.code.value[0], error_message=self.message)

  def with_context(self, context: str) -> "ServingError":
    """Returns a copy whose message ends with `context` (e.g. the servable)."""
    if not context or context in self.message:
      return self
    return ServingError(self.code, f"{self.message} [{context}]", self._http_status)


def code_from_number(number: int) -> grpc.StatusCode:
  """Maps a canonical code number (TF's `error_codes.proto`) to grpc's enum."""
  return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def invalid_argument(message: str) -> ServingError:
  return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
  return ServingError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str) -> ServingError:
  return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def unavailable(message: str) -> ServingError:
  return ServingError(grpc.StatusCode.UNAVAILABLE, message)


def resource_exhausted(message: str, http_status: int | None = None) -> ServingError:
  return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, http_status)


def deadline_exceeded(message: str) -> ServingError:
  return ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def internal(message: str) -> ServingError:
  return ServingError(grpc.StatusCode.INTERNAL, message)


def from_exception(exc: BaseException, context: str | None = None) -> ServingError:
  """Converts any exception (TF op errors included) into a `ServingError`.

  TF's `OpError.error_code` uses the same canonical numbering as gRPC, so a
  session's INVALID_ARGUMENT or DEADLINE_EXCEEDED reaches the client as such.
  """
  if isinstance(exc, ServingError):
    error = exc
  else:
    number = getattr(exc, "error_code", None)
    if isinstance(number, int):
      message = getattr(exc, "message", None) or str(exc)
      error = ServingError(code_from_number(number), message)
    else:
      error = ServingError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
  return error.with_context(context) if context else error


def answered(exc: BaseException) -> ServingError:
  """`from_exception(exc)` for the front end that answers the call with it.

  It also drops the tracebacks of `exc` and of every exception chained to it
  (`__cause__`, `__context__`). Those tracebacks hold the frames the error was
  raised through, and those frames hold the request. A frame that also holds
  the exception closes a reference cycle: a handler's local `error`, or a
  batch task that keeps its error and waits in a frame of the traceback. Such
  a cycle outlives the call until Python's cyclic collector runs, which bad
  requests (few objects each) trigger only about every tenth call: until then
  each one stays in memory, however large. Without the tracebacks, the
  request is freed when its error is sent.

  Call it last, once the error has been logged. The traceback is gone after.
  """
  error = from_exception(exc)
  seen = set()
  pending: list[BaseException | None] = [exc, error]
  while pending:
    chained = pending.pop()
    if chained is None or id(chained) in seen:
      continue
    seen.add(id(chained))
    chained.__traceback__ = None
    pending += [chained.__cause__, chained.__context__]
  return error
