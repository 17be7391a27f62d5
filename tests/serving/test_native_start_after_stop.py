"""A native server shut down before it starts refuses to start, rather than serve for good.

`Server.stop()` from another thread can land before the native gRPC server's `start()`. The start then
opened its port after the shutdown, with polling threads that nothing would stop, and destroying the
server aborted the process (std::terminate on a joinable thread). It runs in a child process, so that
an abort fails this test rather than the test runner.
"""

import os
import subprocess
import sys
import textwrap

import serving_testlib as lib

from tests import conftest as root_conftest

_SCRIPT = textwrap.dedent(
  """
  import gc
  import tensorflow as tf
  from serving import native

  module = native.module()
  server = module.Server(lambda method, request, timeout: (12, "unimplemented", b""), module.Metrics([1.0], [1.0]),
                         None, -1, [], None, False, 0, False, False, 1, True)
  server.add_port("127.0.0.1:0")
  server.shutdown(0)
  try:
    server.start()
    print("started")
  except RuntimeError as e:
    print("refused:", e)
  server.shutdown(0)
  del server
  gc.collect()
  """
)


def test_a_start_after_the_shutdown_is_refused_and_the_process_lives(tmp_path):
  root_conftest.require_native()
  script = tmp_path / "start_after_stop.py"
  script.write_text(_SCRIPT)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=lib.REPO_ROOT)
  done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == "refused: The gRPC server was shut down before it started", done.stdout
