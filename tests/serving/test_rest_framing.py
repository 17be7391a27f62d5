"""REST request framing (RFC 9112): where a request ends, what its body is, and the HTTP-level errors,
answered `{"error": ...}` with a status line like every other error."""

import json
import socket

import pytest
import serving_testlib as lib

from serving.model_servers import http_framing

PREDICT = f"/v1/models/{lib.TF2_MODEL}:predict"
BODY = json.dumps({"instances": [1.0, 3.0]}).encode()
ANSWER = {"predictions": [2.5, 3.5]}
LIMIT = 128 * 1024  # The server's --rest_api_max_body_bytes: trailers reach their own limit first.

_POST = b"POST / HTTP/1.1\r\n"
_CHUNKED = _POST + b"Transfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
  "request_bytes, end, status, body",
  [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /next", 27, None, b""),
    (b"GET / HTTP/1.1\nHost: x\n\n", 24, None, b""),
    (b"\r\nGET / HTTP/1.1\r\n\r\n", 2, None, b""),  # An empty request line: the handler closes.
    (_POST + b"Content-Length: 3\r\n\r\nabcdef", 41, None, b"abc"),
    (_POST + b"Content-Length: 3\r\n\r\nab", None, None, None),
    (_POST + b"Content-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabc", 63, None, b"abc"),  # One value.
    (_POST + b"Content-Length: 99\r\n\r\n", 39, 413, None),  # Over the limit (32).
    (_POST + b"Content-Length: x\r\n\r\nabc", 38, 400, None),
    (_POST + b"Content-Length: +3\r\n\r\nabc", 39, 400, None),  # Only digits: not Python's int().
    (_POST + b"Content-Length: 0_3\r\n\r\nabc", 40, 400, None),
    (_POST + b"Content-Length: 3\r\nContent-Length: 0\r\n\r\nabc", 57, 400, None),  # Differing values.
    (_CHUNKED + b"3\r\nabc\r\n0\r\n\r\nGET", 60, None, b"abc"),
    (_CHUNKED + b"3;a=b\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", 72, None, b"abc"),  # An extension, a trailer.
    (_CHUNKED + b"3\r\nabc\r\n0\r\n", None, None, None),
    (_CHUNKED + b"zz\r\nabc", 51, 400, None),
    (_CHUNKED + b"0x3\r\nabc\r\n0\r\n\r\n", 52, 400, None),  # Only HEXDIG.
    (_CHUNKED + b"+3\r\nabc\r\n0\r\n\r\n", 51, 400, None),
    (_CHUNKED + b" 3\r\nabc\r\n0\r\n\r\n", 51, 400, None),
    (_CHUNKED + b"3\r\nabcXY0\r\n\r\n", 55, 400, None),  # The data doesn't end with CRLF.
    (_CHUNKED + b"21\r\n", 51, 413, None),  # 33 bytes of data.
    # 2 data bytes in 38 bytes sent: sizes and extensions count toward the limit.
    (_CHUNKED + b"1;ext=aaaaaaaaaa\r\nx\r\n1;ext=aaaaaaaaaa\r\ny\r\n0\r\n\r\n", 79, 413, None),
    (_POST + b"Transfer-Encoding: gzip\r\n\r\n", 44, 400, None),  # The body's end is unknown.
    (_POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 53, 501, None),
  ],
)
def test_request_framing(request_bytes, end, status, body):
  whole = http_framing.RequestFramer(max_body_bytes=32)
  assert whole.end(bytearray(request_bytes)) == end
  split = http_framing.RequestFramer(max_body_bytes=32)
  ends = [split.end(bytearray(request_bytes[:n])) for n in range(1, len(request_bytes) + 1)]
  assert ends[-1] == end
  assert all(e is None or e == end for e in ends)  # Fed in pieces, the same end.
  if end is not None:
    framed = whole.take(bytearray(request_bytes))
    assert (framed.error or (None,))[0] == status
    assert framed.body == (body or b"")


@pytest.mark.parametrize(
  "request_bytes, status, close",
  [
    (_POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", None, True),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", None, True),
    (_CHUNKED + b"1;" + b"e" * 300 + b"\r\n", 400, True),  # An extension over MAX_CHUNK_LINE_BYTES.
    (_CHUNKED + b"0\r\n" + (b"X-Pad: " + b"a" * 8000 + b"\r\n") * 9, 431, True),  # Trailers over 64 KiB.
  ],
)
def test_framing_without_a_body_limit(request_bytes, status, close):
  """Chunk lines and trailers are bounded even with no --rest_api_max_body_bytes; a request with
  both Content-Length and chunked, or chunked in HTTP/1.0, closes its connection after the answer."""
  framer = http_framing.RequestFramer(max_body_bytes=0)
  buf = bytearray(request_bytes)
  assert framer.end(buf) is not None
  framed = framer.take(buf)
  assert ((framed.error or (None,))[0], framed.close) == (status, close)


@pytest.fixture(scope="module")
def port(tmp_path_factory):
  """A server's REST port: half_plus_two, --rest_api_max_body_bytes=LIMIT."""
  root = tmp_path_factory.mktemp("framing")
  lib.write_tf2_half_plus_two(str(root / lib.TF2_MODEL / "1"))
  server = lib.InProcessServer(
    model_name=lib.TF2_MODEL,
    model_base_path=str(root / lib.TF2_MODEL),
    rest_api_port=lib.REST_ANY_PORT,
    rest_api_max_body_bytes=LIMIT,
  )
  yield server.server.rest_port
  server.stop()


def _exchange(port: int, data: bytes) -> tuple[bytes, dict, bytes, bool]:
  """Sends `data` on a new connection: (status line, headers, body, whether the server then closed)."""
  with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
    sock.sendall(data)
    reply = b""
    while b"\r\n\r\n" not in reply:
      more = sock.recv(65536)
      assert more, f"closed without an answer after {reply!r}"
      reply += more
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
      more = sock.recv(65536)
      assert more
      body += more
    closed = headers.get("connection") == "close"
    if closed:
      assert sock.recv(65536) == b""  # Nothing after the answer, then the end of the stream.
    return status_line.encode(), headers, body, closed


def _chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
  head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
  return head + b"".join(chunks) + b"0\r\n" + trailer + b"\r\n"


def _predict(headers: bytes, body: bytes = BODY, version: bytes = b"HTTP/1.1") -> bytes:
  return b"POST " + PREDICT.encode() + b" " + version + b"\r\nHost: x\r\n" + headers + b"\r\n" + body


@pytest.mark.parametrize(
  "request_bytes, status, message",
  [
    (_predict(b"Content-Length: %d\r\nContent-Length: 0\r\n" % len(BODY)), 400, "Invalid Content-Length"),
    (_predict(b"Content-Length: +%d\r\n" % len(BODY)), 400, "Invalid Content-Length"),
    (_predict(b"Transfer-Encoding: chunked\r\n", b"0x%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"), 400, "chunk size"),
    (_predict(b"Transfer-Encoding: gzip, chunked\r\n", b""), 501, "Transfer-Encoding"),
    (_chunked(b"1;" + b"e" * 300 + b"\r\n \r\n"), 400, "chunk size line is longer than 256 bytes"),
    # 1 byte of data and 206 bytes of framing, 1,000 times: over the limit as sent.
    (_chunked(*[b"1;" + b"e" * 200 + b"\r\n \r\n"] * 1000), 413, "--rest_api_max_body_bytes"),
    (_chunked(b"%x\r\n" % len(BODY) + BODY + b"\r\n", trailer=b"X-Pad: 1\r\n" * 7000), 431, "trailer"),
    (_predict(b"Content-Length: %d\r\n" % len(BODY), version=b"HTTP/2.0"), 505, "HTTP version"),
    (_predict(b"Content-Length: %d\r\n" % len(BODY), version=b"HTTP/0.9"), 505, "HTTP version"),
    (b"GARBAGE\r\n\r\n", 400, "Bad request"),
    (f"GET /v1/models/{lib.TF2_MODEL}\r\n\r\n".encode(), 400, "HTTP/0.9"),  # No version: no HTTP/0.9 reply.
    (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501, "Unsupported method"),
  ],
)
def test_bad_framing_and_request_lines_answer_json_and_close(port, request_bytes, status, message):
  status_line, headers, body, closed = _exchange(port, request_bytes)
  assert status_line.startswith(b"HTTP/1.1 %d " % status)
  assert headers["content-type"] == "application/json" and message in json.loads(body)["error"]
  assert closed


def test_chunked_with_content_length_is_answered_then_closed(port):
  """Chunked framing wins, and a proxy that framed it by Content-Length gets no next request here."""
  request = _predict(
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"
  )
  status_line, _, body, closed = _exchange(port, request)
  assert status_line.startswith(b"HTTP/1.1 200 ") and json.loads(body) == ANSWER and closed


def test_chunked_bodies_within_the_limit_keep_the_connection(port):
  request = _chunked(
    b"5;name=value\r\n" + BODY[:5] + b"\r\n", b"%x\r\n" % (len(BODY) - 5) + BODY[5:] + b"\r\n", trailer=b"X-T: 1\r\n"
  )
  status_line, _, body, closed = _exchange(port, request)
  assert status_line.startswith(b"HTTP/1.1 200 ") and json.loads(body) == ANSWER and not closed
