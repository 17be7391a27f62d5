"""fgr-serve: TF Serving's model server command line, on our server.

  fgr-serve --port=8500 --model_name=NAME --model_base_path=/models/NAME

Flags keep TF Serving's names and defaults (`server_flags`).
"""

import dataclasses
import os
import sys

from serving.util import allocator, runtime, stop_signals

if __name__ == "__main__":  # python -m: before TensorFlow's import (see there), as fgr-serve's console script.
  from cli import launch  # Light: sets TensorFlow's log level and devices, which it reads once, at its load.

  launch.prepare_tensorflow(sys.argv)
  runtime.prepare_server_process(sys.argv[1:])

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging
from tensorflow.core.protobuf import config_pb2

from serving import errors
from serving.config import text_config
from serving.model_servers import server as server_lib
from serving.model_servers import server_flags

# pylint: enable=g-import-not-at-top,wrong-import-position

VERSION = "fgr-serve 0.1.0 (TensorFlow Serving API 2.20 compatible)"

FLAGS = flags.FLAGS
# `python -m serving.model_servers.main --help` lists them (they are defined there).
flags.adopt_module_key_flags(server_flags)


def _channel_arguments(text: str):
  """Parses --grpc_channel_arguments ("k=v,k=v"); ints stay ints."""
  arguments = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise app.UsageError(f"--grpc_channel_arguments: expected key=value, got {item!r}")
    arguments.append((key, int(value) if value.lstrip("-").isdigit() else value))
  return arguments


def _session_config() -> config_pb2.ConfigProto:
  config = config_pb2.ConfigProto()
  if FLAGS.tensorflow_session_config_file:
    config = text_config.parse_text_proto(FLAGS.tensorflow_session_config_file, config_pb2.ConfigProto)
  if FLAGS.tensorflow_session_parallelism:
    config.intra_op_parallelism_threads = FLAGS.tensorflow_session_parallelism
    config.inter_op_parallelism_threads = FLAGS.tensorflow_session_parallelism
  if FLAGS.tensorflow_intra_op_parallelism:
    config.intra_op_parallelism_threads = FLAGS.tensorflow_intra_op_parallelism
  if FLAGS.tensorflow_inter_op_parallelism:
    config.inter_op_parallelism_threads = FLAGS.tensorflow_inter_op_parallelism
  return config


def options_from_flags() -> server_lib.Options:
  """Builds server options from the parsed flags (same names, one to one)."""
  if FLAGS.rest_api_port and FLAGS.rest_api_port == FLAGS.port:
    raise app.UsageError("--rest_api_port must differ from --port")
  values = {
    field.name: FLAGS[field.name].value for field in dataclasses.fields(server_lib.Options) if field.name in FLAGS
  }
  values["grpc_channel_arguments"] = _channel_arguments(FLAGS.grpc_channel_arguments)
  values["session_config"] = _session_config()
  return server_lib.Options(**values)


def load_custom_ops(enabled: bool) -> None:
  """Registers ScaNN's TF ops (Scann>...) if scann is installed."""
  if not enabled:
    logging.info("Not importing scann (--noload_scann_ops)")
    return
  try:
    import scann  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    logging.info("scann is not installed; SavedModels using Scann>... ops will fail to load")
  else:
    logging.info("Imported scann from %s: Scann>... ops are registered", os.path.dirname(scann.__file__))


def _write_port_file(path: str, server: server_lib.Server) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(f"grpc={server.grpc_port}\nrest={server.rest_port}\n")
  os.replace(tmp, path)  # Readers never see a half-written file.


def main(argv) -> int:
  """Runs the server until SIGTERM/SIGINT, then drains and exits 0."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.version:
    print(VERSION)
    return 0
  server_flags.check_unsupported_flags()
  # Set up by the entry points, before TensorFlow was imported.
  options = dataclasses.replace(
    options_from_flags(), retain_freed_memory=FLAGS.retain_freed_memory and runtime.freed_memory_retained()
  )
  logging.info(
    "malloc: %s; freed memory %s",
    "mimalloc" if allocator.mimalloc_active() else "the system's",
    "stays in the process" if options.retain_freed_memory else "goes back to the system",
  )
  load_custom_ops(FLAGS.load_scann_ops)

  server = server_lib.Server(options)
  runtime.freeze_gc()  # Before the first load: see runtime.py.

  def on_signal(signum: int) -> None:
    logging.info("Received signal %d: shutting down gracefully", signum)
    server.request_stop()

  with stop_signals.StopSignals(on_stop=on_signal) as signals:
    try:
      server.start()
    except (errors.ServingError, OSError, RuntimeError) as e:
      logging.error("Failed to start server: %s", getattr(e, "message", None) or e)
      server.stop(grace_seconds=0)
      _exit_if_loading(server, 1)  # Another model's load may still be running.
      return 1
    if not signals.received:
      print(f"FGR_SERVE_GRPC_PORT={server.grpc_port}", flush=True)
      if server.rest_port:
        print(f"FGR_SERVE_REST_PORT={server.rest_port}", flush=True)
      if FLAGS.port_file:
        _write_port_file(FLAGS.port_file, server)
      signals.wait()
  server.stop()
  stop_signals.ignore()
  _exit_if_loading(server, 0)
  logging.info("Server stopped")
  return 0


def _exit_if_loading(server: server_lib.Server, code: int) -> None:
  """Exits with `code` now, without Python's teardown, if a version is still loading after the stop.

  Python's exit would join the load threads, and TensorFlow cannot cancel a load: the process would
  wait minutes for a large version, or forever for one on a hung file system. Everything that served
  has drained and unloaded by now, and a load writes nothing.
  """
  abandoned = server.core.loads_in_progress() if server.core is not None else []
  if not abandoned:
    return
  logging.info("Server stopped; not waiting for the loads still running (%s)", "; ".join(abandoned))
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def run() -> None:
  """Console-script entry point (fgr-serve)."""
  app.run(main)


if __name__ == "__main__":
  run()
