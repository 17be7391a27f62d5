"""A REST port already in use fails fgr-serve's start-up with one line naming it, not a traceback."""

import socket

import pytest

from serving.model_servers import server as server_lib
from tests.serving import serving_testlib as lib


def test_a_rest_port_in_use_is_an_os_error_naming_it(tmp_path):
  """The bind's OSError was lost: socketserver's cleanup called our server_close before the pool it shuts
  down existed, so fgr-serve died with an AttributeError traceback instead of "Failed to start server"."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    server = server_lib.Server(
      server_lib.Options(
        port=0, rest_api_port=port, model_name="m", model_base_path=str(tmp_path / "m"), native=lib.NATIVE
      )
    )
    try:
      with pytest.raises(OSError, match=rf"cannot serve REST at 127\.0\.0\.1:{port} \(--rest_api_port\)"):
        server.start()
    finally:
      server.stop(grace_seconds=0)
