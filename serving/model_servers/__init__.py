"""The model server process: flags, gRPC and REST front ends."""

import sys


def run_server() -> None:
  """fgr-serve's console entry point: process set-up that must precede
  TensorFlow's import, then the server (`main.run`)."""
  from serving.util import runtime  # pylint: disable=g-import-not-at-top

  runtime.prepare_server_process(sys.argv[1:])
  from serving.model_servers import main  # pylint: disable=g-import-not-at-top

  main.run()
