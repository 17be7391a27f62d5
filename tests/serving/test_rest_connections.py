"""REST connections: slow or idle clients hold no worker thread; keep-alive, pipelining, draining on
SIGTERM's path (`HttpServer.stop`); the limits on connections and on bytes buffered, and accepting
when out of file descriptors. Request framing: test_rest_framing.py."""

import contextlib
import errno
import http.client
import json
import os
import socket
import socketserver
import threading
import time

import pytest
import serving_testlib as lib

from serving.model_servers import http_server

PREDICT = f"/v1/models/{lib.TF2_MODEL}:predict"
BODY = json.dumps({"instances": [1.0, 3.0]}).encode()
ANSWER = {"predictions": [2.5, 3.5]}


def _raw(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
  return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _read_reply(sock: socket.socket, buf: bytearray) -> tuple[int, dict, bytes]:
  """(status, headers, body) of the next response on `sock` (Content-Length framed); `buf` keeps
  what was read past it."""
  while b"\r\n\r\n" not in buf:
    data = sock.recv(65536)
    assert data, f"the server closed the connection; read {bytes(buf)!r}"
    buf += data
  head, _, rest = bytes(buf).partition(b"\r\n\r\n")
  lines = head.decode().split("\r\n")
  headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
  length = int(headers["content-length"])
  while len(rest) < length:
    data = sock.recv(65536)
    assert data
    rest += data
  buf[:] = rest[length:]
  return int(lines[0].split()[1]), headers, rest[:length]


def _half_plus_two_server(tmp_path, **flags) -> lib.InProcessServer:
  """fgr-serve with REST on a free port, serving half_plus_two, with `flags`."""
  lib.write_tf2_half_plus_two(str(tmp_path / lib.TF2_MODEL / "1"))
  return lib.InProcessServer(
    model_name=lib.TF2_MODEL, model_base_path=str(tmp_path / lib.TF2_MODEL), rest_api_port=lib.REST_ANY_PORT, **flags
  )


@pytest.fixture
def patient(native, tmp_path):
  """A server with 2 REST threads and a 10-minute --rest_api_timeout_in_ms: a client that sends
  slowly could hold a thread for the whole test."""
  server = _half_plus_two_server(
    tmp_path, rest_api_num_threads=2, rest_api_timeout_in_ms=600_000, rest_api_max_body_bytes=4096
  )
  yield server
  server.stop()


def test_slow_and_idle_clients_hold_no_worker(patient):
  port = patient.server.rest_port
  clients = [socket.create_connection(("127.0.0.1", port), timeout=120) for _ in range(8)]
  try:
    clients[1].sendall(b"POST /v1/mod")  # Half a request line.
    clients[2].sendall(b"POST /v1/models/x:predict HTTP/1.1\r\nHost: x\r\n")  # Headers not ended.
    clients[3].sendall(_raw("POST", PREDICT, BODY)[:-3])  # Body not ended.
    clients[4].sendall(  # A chunked body that stops between chunks.
      f'POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{{"in\r\n'.encode()
    )
    # An idle keep-alive connection after a complete exchange.
    clients[5].sendall(_raw("POST", PREDICT, BODY))
    status, _, data = _read_reply(clients[5], bytearray())
    assert (status, json.loads(data)) == (200, ANSWER)
    for _ in range(3):  # Each would have taken one of the 2 threads for 10 minutes.
      assert lib.post_json(port, PREDICT, BODY, timeout=60) == (200, ANSWER)
    # The half-sent request finishes and is answered.
    clients[3].sendall(_raw("POST", PREDICT, BODY)[-3:])
    status, _, data = _read_reply(clients[3], bytearray())
    assert (status, json.loads(data)) == (200, ANSWER)
  finally:
    for client in clients:
      client.close()


def test_stop_closes_idle_connections_at_once(native, tmp_path):
  """SIGTERM's drain waits for requests being handled, not for connections between requests."""
  server = _half_plus_two_server(tmp_path, rest_api_timeout_in_ms=600_000)
  port = server.server.rest_port
  clients = [socket.create_connection(("127.0.0.1", port), timeout=120) for _ in range(16)]
  clients[0].sendall(_raw("POST", PREDICT, BODY))
  assert _read_reply(clients[0], bytearray())[0] == 200
  clients[1].sendall(_raw("POST", PREDICT, BODY)[:-1])
  lib.wait_for(lambda: len(server.server._http._server._idle) == 16)  # pylint: disable=protected-access
  started = time.monotonic()
  server.stop()
  assert time.monotonic() - started < 60  # Generous; the connections' timeout is 10 minutes.
  for client in clients:
    assert client.recv(1024) == b""  # Closed, without an answer.
    client.close()


def test_keep_alive_and_pipelining(patient):
  port = patient.server.rest_port
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  try:
    for _ in range(3):
      connection.request("POST", PREDICT, body=BODY)
      response = connection.getresponse()
      assert (response.status, json.loads(response.read())) == (200, ANSWER)
      assert response.version == 11 and not response.will_close
    first_socket = connection.sock
    connection.request("GET", f"/v1/models/{lib.TF2_MODEL}")
    assert connection.getresponse().status == 200
    assert connection.sock is first_socket  # One connection throughout.
  finally:
    connection.close()
  with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
    # Three requests in one write, the second chunked: answered in order.
    chunked = (
      f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
      + b"5\r\n"
      + BODY[:5]
      + f"\r\n{len(BODY) - 5:x}\r\n".encode()
      + BODY[5:]
      + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    sock.sendall(_raw("POST", PREDICT, BODY) + chunked + _raw("GET", f"/v1/models/{lib.TF2_MODEL}"))
    buf = bytearray()
    assert [_read_reply(sock, buf)[0] for _ in range(3)] == [200, 200, 200]


def test_byte_by_byte_and_expect_continue(patient):
  port = patient.server.rest_port
  with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
    for byte in _raw("POST", PREDICT, BODY):
      sock.send(bytes([byte]))
    status, _, data = _read_reply(sock, bytearray())
    assert (status, json.loads(data)) == (200, ANSWER)
  with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
    request = _raw("POST", PREDICT, BODY, headers="Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    sock.sendall(head + b"\r\n\r\n")
    reply = b""
    while b"\r\n\r\n" not in reply:
      reply += sock.recv(1024)
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    buf = bytearray(reply[len(b"HTTP/1.1 100 Continue\r\n\r\n") :])
    sock.sendall(body)
    status, _, data = _read_reply(sock, buf)
    assert (status, json.loads(data)) == (200, ANSWER)


def test_limits_answer_before_the_body(patient):
  port = patient.server.rest_port
  with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
    # Over --rest_api_max_body_bytes (4096): 413 on the headers alone, and the connection closes.
    sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{{".encode())
    status, headers, data = _read_reply(sock, bytearray())
    assert status == 413 and "--rest_api_max_body_bytes" in json.loads(data)["error"]
    assert headers["connection"] == "close"
  with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
    sock.sendall(
      f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2000\r\n".encode() + b" " * 5000
    )
    status, _, data = _read_reply(sock, bytearray())
    assert status == 413
  with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
    sock.sendall(f"GET /v1/models/{lib.TF2_MODEL} HTTP/1.1\r\n".encode() + b"X-Filler: y\r\n" * 6000)
    status, headers, _ = _read_reply(sock, bytearray())
    assert status == 431 and headers["connection"] == "close"


def test_answers_are_one_write_on_a_no_delay_socket(tmp_path):
  """A kept-alive connection's answers don't wait for the client's delayed ACKs (Nagle)."""
  server = _half_plus_two_server(tmp_path)
  loop = server.server._http._server  # pylint: disable=protected-access
  try:
    with socket.create_connection(("127.0.0.1", server.server.rest_port), timeout=60) as sock:
      lib.wait_for(lambda: len(loop._idle) == 1)  # pylint: disable=protected-access
      accepted = next(iter(loop._idle)).sock  # pylint: disable=protected-access
      assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
      for _ in range(5):
        sock.sendall(_raw("POST", PREDICT, BODY))
        # One write of a small answer arrives as one segment on loopback, so one recv holds the status
        # line, headers and body; a body written apart from the headers arrives after them.
        head, _, body = sock.recv(65536).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body) == ANSWER
  finally:
    server.stop()


def test_connection_limit_replaces_the_longest_waiting(tmp_path):
  server = _half_plus_two_server(tmp_path, rest_api_max_connections=3)
  loop = server.server._http._server  # pylint: disable=protected-access
  port = server.server.rest_port
  waiting = []
  try:
    for count in range(1, 4):
      waiting.append(socket.create_connection(("127.0.0.1", port), timeout=60))
      waiting[-1].sendall(_raw("POST", PREDICT, BODY)[:-3])
      lib.wait_for(lambda n=count: len(loop._idle) == n)  # pylint: disable=protected-access
    # A fourth connection takes the place of the first, which is closed without an answer.
    assert lib.post_json(port, PREDICT, BODY, timeout=60) == (200, ANSWER)
    assert waiting[0].recv(1024) == b""
    for sock in waiting[1:]:
      sock.sendall(_raw("POST", PREDICT, BODY)[-3:])
      status, _, data = _read_reply(sock, bytearray())
      assert (status, json.loads(data)) == (200, ANSWER)
  finally:
    for sock in waiting:
      sock.close()
    server.stop()


_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@contextlib.contextmanager
def _bare_server(release: threading.Event, **limits):
  """The REST event loop on a free port with one worker, whose handler answers 200 once `release` is
  set."""

  class Handler(socketserver.BaseRequestHandler):
    close_connection = True

    def handle(self):
      release.wait(60)
      self.request[0].sendall(_OK)

  server = http_server._PooledHTTPServer(("127.0.0.1", 0), Handler, 1, **limits)  # pylint: disable=protected-access
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield server
  finally:
    release.set()
    server.shutdown()
    server.server_close()


def test_connections_over_the_limit_are_refused_while_all_are_handled():
  release = threading.Event()
  with _bare_server(release, max_connections=2) as server:
    clients = [socket.create_connection(server.server_address, timeout=60) for _ in range(2)]
    try:
      for client in clients:
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
      # One request runs, one waits for the worker: no connection is left to replace.
      lib.wait_for(lambda: server._open == 2 and not server._idle)  # pylint: disable=protected-access
      with socket.create_connection(server.server_address, timeout=60) as third:
        status, headers, data = _read_reply(third, bytearray())
        assert status == 503 and "--rest_api_max_connections" in json.loads(data)["error"]
        assert headers["connection"] == "close" and third.recv(1024) == b""
      release.set()
      for client in clients:
        assert client.recv(1024) == _OK
    finally:
      for client in clients:
        client.close()


def test_accept_backs_off_when_out_of_file_descriptors(monkeypatch):
  """Out of file descriptors, the listening socket stays readable: retrying at once spun the event
  loop, logging each failure."""
  release = threading.Event()
  release.set()
  attempts = []
  out_of_fds = threading.Event()
  out_of_fds.set()
  accept = socket.socket.accept
  with _bare_server(release) as server:

    def failing_accept(sock):
      if sock is server.socket and out_of_fds.is_set():
        attempts.append(1)
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
      return accept(sock)

    monkeypatch.setattr(socket.socket, "accept", failing_accept)
    with socket.create_connection(server.server_address, timeout=60) as client:
      lib.wait_for(lambda: attempts)
      time.sleep(0.5)  # A loop retrying at once fails thousands of times meanwhile.
      assert len(attempts) <= 3
      out_of_fds.clear()  # Accepted after the back-off.
      client.sendall(b"GET / HTTP/1.1\r\n\r\n")
      assert client.recv(1024) == _OK


def _rss() -> int:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_buffered_bytes_stay_within_the_budget(tmp_path):
  """Over all connections, request bytes read and not yet answered stay within
  --rest_api_max_buffered_bytes: a request that would pass it is refused 429, so clients sending large
  bodies slowly can't grow the server (which keeps freed memory) without bound."""
  mib = 1 << 20
  server = _half_plus_two_server(tmp_path, rest_api_max_body_bytes=8 * mib, rest_api_max_buffered_bytes=8 * mib)
  loop = server.server._http._server  # pylint: disable=protected-access
  port = server.server.rest_port
  holder = socket.create_connection(("127.0.0.1", port), timeout=60)
  try:
    holder.sendall(_raw("POST", PREDICT, b" " * (6 * mib + 1))[:-1])  # Held: one byte short.
    lib.wait_for(lambda: loop._buffered >= 6 * mib)  # pylint: disable=protected-access
    assert lib.post_json(port, PREDICT, BODY, timeout=60) == (200, ANSWER)  # Small requests fit.
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
      # A Content-Length that can't fit is refused from the headers.
      sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: {4 * mib}\r\n\r\n".encode())
      status, headers, data = _read_reply(sock, bytearray())
      assert status == 429 and "--rest_api_max_buffered_bytes" in json.loads(data)["error"]
      assert headers["connection"] == "close" and sock.recv(1024) == b""
    before = _rss()
    for _ in range(16):  # 64 MiB of chunked bodies, each refused once the total passes 8 MiB.
      with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(4):
          sock.sendall(f"{mib:x}\r\n".encode() + b" " * mib + b"\r\n")
        status, _, data = _read_reply(sock, bytearray())
        assert status == 429 and "--rest_api_max_buffered_bytes" in json.loads(data)["error"]
    # Generous: the budget left 2 MiB per attempt to read, and the allocator keeps some.
    assert _rss() - before < 24 * mib
    holder.close()
    lib.wait_for(lambda: loop._buffered == 0)  # pylint: disable=protected-access
    assert lib.post_json(port, PREDICT, BODY, timeout=60) == (200, ANSWER)
  finally:
    holder.close()
    server.stop()
