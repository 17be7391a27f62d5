"""HTTP/1.x request framing for the REST front end (RFC 9112 6): where one request ends in a
connection's bytes, and its body decoded from Content-Length or chunked framing.

One parser serves the event loop and the handler alike, so the two can never frame a stream
differently: a proxy in front that frames it some other way is the request-smuggling risk, and the
strict rules here (digits-only lengths, HEXDIG chunk sizes, ambiguous framing closes the connection)
leave it nothing to disagree with.
"""

import dataclasses
import http.client
import io
import re

# The request line and headers one request may send before the blank line (431 beyond it); a chunked
# body's trailer section has the same limit.
MAX_HEADER_BYTES = 64 * 1024
# A chunk-size line: the size in hex, any chunk extensions and the line end (400 beyond it). The API
# uses no extensions; the bound keeps a client from sending kilobytes of them per byte of data.
MAX_CHUNK_LINE_BYTES = 256
_HEADER_END = re.compile(rb"\n\r?\n")
_DIGITS = re.compile(rb"[0-9]+")
# chunk-size [chunk-ext] line end (RFC 9112 7.1.1): HEXDIG only, no sign, prefix or spaces before.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?\r?\n")


class HeadersTooLarge(Exception):
  pass


@dataclasses.dataclass
class Framed:
  """One request as the event loop framed it: what the handler reads, or the error it answers instead.

  Attributes:
    head: The request line and header section.
    body: The body, decoded from its chunks if it was sent chunked.
    error: (HTTP status, message) when the body's framing is invalid or over a limit; the handler
      answers it and closes the connection, whose next bytes can't be trusted to start a request.
    close: Close the connection after the answer: the framing headers were ambiguous (RFC 9112 6.1).
  """

  head: bytes
  body: bytes = b""
  error: tuple[int, str] | None = None
  close: bool = False


class RequestFramer:
  """Frames the first HTTP/1.x request in a connection's buffer as its bytes arrive (RFC 9112 6):
  the server's one reader of Content-Length and chunked bodies.

  A request is handed to a worker once it is complete, or once what arrived is enough to refuse it:
  a body over the limit (413), a Content-Length that isn't one run of digits, a malformed chunk or an
  unsupported Transfer-Encoding (400, 501), a trailer section over MAX_HEADER_BYTES (431). A chunked
  body counts every byte it sends toward the limit: chunk sizes, extensions, data and trailers.

  Args:
    max_body_bytes: Largest body (--rest_api_max_body_bytes); 0: no limit.
  """

  def __init__(self, max_body_bytes: int):
    self._limit = max_body_bytes
    self.reset()

  def reset(self) -> None:
    self._scanned = 0  # Where the search for the headers' end resumes.
    self.header_end: int | None = None
    self.expect_continue = False
    self.body_end: int | None = None  # Where the request ends, once known.
    self._chunk_pos: int | None = None  # The next chunk-size or trailer line (chunked bodies).
    self._chunks: list[tuple[int, int]] = []  # Where each chunk's data lies in the buffer.
    self._trailer_start: int | None = None
    self._error: tuple[int, str] | None = None
    self._close = False

  def end(self, buf: bytearray) -> int | None:
    """The length of the first request in `buf` (or of the part that is enough to refuse it), None if
    more must arrive first.

    Raises:
      HeadersTooLarge: the request line and headers pass MAX_HEADER_BYTES.
    """
    if self.header_end is None:
      if buf[:2] == b"\r\n" or buf[:1] == b"\n":  # An empty request line: the handler closes.
        self.header_end = self.body_end = 2 if buf[:1] == b"\r" else 1
        return self.body_end
      match = _HEADER_END.search(buf, max(0, self._scanned - 3))
      if not match:
        self._scanned = len(buf)
        if len(buf) > MAX_HEADER_BYTES:
          raise HeadersTooLarge()
        return None
      self.header_end = match.end()
      if self.header_end > MAX_HEADER_BYTES:
        raise HeadersTooLarge()
      self._frame_body(bytes(buf[: self.header_end]))
    if self._chunk_pos is None:
      return self.body_end if len(buf) >= self.body_end else None
    if self.body_end is None:
      self.body_end = self._chunked_end(buf)
    return self.body_end

  def take(self, buf: bytearray) -> Framed:
    """The request `end` found in `buf`."""
    head = bytes(buf[: self.header_end])
    if self._error is not None:
      return Framed(head, error=self._error, close=True)
    if self._chunk_pos is not None:
      body = b"".join(buf[start:stop] for start, stop in self._chunks)
    else:
      body = bytes(buf[self.header_end : self.body_end])
    return Framed(head, body, close=self._close)

  def _fail(self, end: int, status: int, message: str) -> int:
    self._error = (status, message)
    self.body_end = end
    return end

  def _too_large(self, size: int | None) -> str:
    """The 413 message: for a body of `size` bytes, or for a chunked one (None)."""
    limit = f"the limit of {self._limit} bytes (--rest_api_max_body_bytes)"
    if size is None:
      return f"Chunked request body exceeds {limit}, counting its chunk sizes, extensions and trailers"
    return f"Request body of {size} bytes exceeds {limit}"

  def _frame_body(self, head: bytes) -> None:
    """Reads the framing headers: sets where the body ends, or starts following its chunks."""
    self.body_end = self.header_end  # No body, or refused from the headers alone.
    request_line, _, fields = head.partition(b"\n")
    try:
      headers = http.client.parse_headers(io.BytesIO(fields))
    except http.client.HTTPException:  # Too many or too long: the handler answers 431.
      return
    version = request_line.split()[-1:]
    http_1_0 = not version or version[0] in (b"HTTP/1.0", b"HTTP/0.9")
    self.expect_continue = headers.get("Expect", "").lower() == "100-continue" and not http_1_0
    codings = headers.get_all("Transfer-Encoding")
    lengths = headers.get_all("Content-Length")
    if codings is not None:
      codings = [c.strip().lower() for c in ",".join(codings).split(",")]
      if codings != ["chunked"]:
        # Without chunked last the body's end is unknown (RFC 9112 6.3); with other codings before
        # it, the body could be framed but not decoded.
        status = 501 if codings[-1] == "chunked" else 400
        self._fail(self.header_end, status, f"Unsupported Transfer-Encoding: {', '.join(codings)!r}; only chunked")
        return
      self._chunk_pos = self.header_end
      self.body_end = None
      # Chunked wins over Content-Length; a sender that set both, or chunked in HTTP/1.0, may have been
      # framed differently by a proxy on the way, so the connection is not reused (RFC 9112 6.1).
      self._close = lengths is not None or http_1_0
      return
    if lengths is None:
      return
    values = {value.strip() for value in ",".join(lengths).encode("latin-1", "replace").split(b",")}
    if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
      self._fail(self.header_end, 400, f"Invalid Content-Length: {', '.join(lengths)[:100]!r}")
      return
    length = int(next(iter(values)))
    if self._limit and length > self._limit:
      self._fail(self.header_end, 413, self._too_large(length))
      return
    self.body_end = self.header_end + length

  def _chunked_end(self, buf: bytearray) -> int | None:
    """Follows the chunks as far as they arrived: the request's end once known, else None."""
    # The body may not reach past `bound`; the same scan, fed the bytes in any pieces, ends alike.
    bound = self.header_end + self._limit if self._limit else None
    while True:
      pos = self._chunk_pos
      if self._trailer_start is None:
        cap = pos + MAX_CHUNK_LINE_BYTES
        beyond = (400, f"Invalid chunked request body: a chunk size line is longer than {MAX_CHUNK_LINE_BYTES} bytes")
      else:
        cap = self._trailer_start + MAX_HEADER_BYTES
        beyond = (431, f"Request trailer fields exceed {MAX_HEADER_BYTES} bytes")
      if bound is not None and bound < cap:
        cap, beyond = bound, (413, self._too_large(None))
      newline = buf.find(b"\n", pos, cap)
      if newline < 0:
        return self._fail(cap, *beyond) if len(buf) >= cap else None
      line_end = newline + 1
      if self._trailer_start is not None:
        self._chunk_pos = line_end
        if line_end - pos <= 2 and buf[pos:line_end] in (b"\r\n", b"\n"):
          return line_end
        continue
      match = _CHUNK_SIZE_LINE.fullmatch(buf, pos, line_end)
      if not match:
        return self._fail(
          line_end, 400, f"Invalid chunked request body: bad chunk size {bytes(buf[pos:line_end])[:40]!r}"
        )
      size = int(match[1], 16)
      if size == 0:
        self._trailer_start = self._chunk_pos = line_end
        continue
      data_end = line_end + size + 2
      if bound is not None and data_end > bound:
        return self._fail(line_end, 413, self._too_large(None))
      if len(buf) < data_end:
        return None  # This chunk-size line is read again once the data is here.
      if buf[data_end - 2 : data_end] != b"\r\n":
        return self._fail(data_end, 400, "Invalid chunked request body: a chunk's data does not end with CRLF")
      self._chunks.append((line_end, data_end - 2))
      self._chunk_pos = data_end
