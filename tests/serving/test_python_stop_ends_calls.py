"""A graceful stop of the Python gRPC front end ends every handler on its loop before closing it.

grpc.aio's stop can return while a handler is still suspended: with a burst of calls arriving as a
SIGTERM's stop began, `fgr-serve --native=off` hung in 3 of ~14 stops. The loop was then closed
with the handler inside its `with` block: its version's in-flight count never went back to zero,
the version's unload waited forever, and so did the process's exit, on that unload thread. Here a
coroutine holding a version on the server's loop stands for such a handler. The scenario runs in a
child process, so that a hang fails this test rather than the test runner.
"""

import os
import subprocess
import sys
import textwrap

import serving_testlib as lib

_SCRIPT = textwrap.dedent(
  """
  import asyncio, pathlib, sys, threading
  from tensorflow_serving.apis import get_model_status_pb2, model_pb2
  import serving_testlib as lib

  root = pathlib.Path(sys.argv[1])
  lib.write_tf2_half_plus_two(str(root / "m" / "1"))
  server = lib.InProcessServer(native="off", model_name="m", model_base_path=str(root / "m"))
  spec = model_pb2.ModelSpec(name="m")
  holding = threading.Event()

  async def handler():  # Suspended with its version held, as a call waiting for its session.
    with server.server.core.servable_handle(spec):
      holding.set()
      await asyncio.sleep(3600)

  asyncio.run_coroutine_threadsafe(handler(), server.server._grpc._loop)
  assert holding.wait(60)
  server.server.stop(grace_seconds=0)  # The version's unload goes on in the background.

  def state():
    status = server.server.core.model_status(spec)
    return get_model_status_pb2.ModelVersionStatus.State.Name(status.model_version_status[0].state)

  try:
    lib.wait_for(lambda: state() == "END", timeout=30)
  finally:
    print(state(), flush=True)
  """
)


def test_a_stop_ends_the_handlers_it_cuts_short(tmp_path):
  script = tmp_path / "stop.py"
  script.write_text(_SCRIPT)
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join([lib.REPO_ROOT, here]))
  try:
    done = subprocess.run(
      [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
  except subprocess.TimeoutExpired as e:
    raise AssertionError(f"the process did not exit: {e.stdout!r}") from e
  # Unloaded: the handler the stop cut short let go of its version.
  assert done.returncode == 0 and done.stdout.split() == ["END"], done.stdout + done.stderr[-3000:]
