"""Console scripts: each sets TensorFlow's start-up environment, then imports and runs its command.

TensorFlow reads its C++ log level and which device types to register once,
when its C++ libraries load, and at its defaults it prints CUDA, oneDNN and
CPU-feature notices on every start: half of `make demo`'s output was those
lines. Both have to be set before the command's module imports TensorFlow,
hence this launcher, which imports nothing heavy itself:

- TF_CPP_MIN_LOG_LEVEL drops the INFO lines. absl's `--verbosity` (`-v`) of 0
  (INFO) or more brings them back. The INFO lines of TensorFlow's Python side
  (a dozen per export) follow the same rule, once absl runs the command.
- TF_ENABLED_DEVICE_TYPES=CPU, only on a machine with no CUDA driver, keeps
  TensorFlow from initialising CUDA, which there can only fail and say so at
  ERROR level.

Either variable already in the environment is left as it is.
"""

import ctypes
import errno
import importlib
import importlib.util
import logging
import os
import re
import sys
import types
from collections.abc import Callable, Sequence

from cli import early_flags

TF_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
# TensorFlow's C++ levels: 0 logs everything, 1 drops INFO, 2 drops WARNING too.
ALL_LOGS = "0"
WARNINGS_AND_ERRORS = "1"
TF_DEVICE_TYPES_ENV = "TF_ENABLED_DEVICE_TYPES"
CPU_ONLY = "CPU"
# The CUDA driver library, as TensorFlow's CUDA platform loads it before it calls cuInit.
CUDA_DRIVER = "libcuda.so.1"


def prepare_tensorflow(argv: Sequence[str]) -> None:
  """Sets what TensorFlow reads when it loads; call it before anything imports TensorFlow."""
  set_tensorflow_log_level(argv)
  skip_cuda_without_a_driver()


def _asks_for_info(argv: Sequence[str]) -> bool:
  """Whether `--verbosity` is given as INFO (0) or more."""
  verbosity = early_flags.flag_value(argv[1:], "verbosity", "v")
  try:
    return verbosity is not None and int(verbosity) >= 0
  except ValueError:
    return False  # absl reports the bad value itself.


def set_tensorflow_log_level(argv: Sequence[str]) -> None:
  """Keeps TensorFlow's C++ INFO lines out unless `--verbosity` asks for INFO."""
  os.environ.setdefault(TF_LOG_LEVEL_ENV, ALL_LOGS if _asks_for_info(argv) else WARNINGS_AND_ERRORS)


# The packages whose Python INFO lines are TensorFlow's (a SavedModel write logs a dozen: signature inputs
# renamed, untraced functions, sharding callback timings, assets and fingerprint written).
_TENSORFLOW_PACKAGES = ("tensorflow", "tf_keras")


class _TensorFlowInfoFilter(logging.Filter):
  """Passes every record but the INFO and DEBUG ones logged from the files of `directories`."""

  def __init__(self, directories: tuple[str, ...]):
    super().__init__()
    self._directories = directories

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or not record.pathname.startswith(self._directories)


def quiet_tensorflow_python_logs(argv: Sequence[str]) -> None:
  """The Python side of `set_tensorflow_log_level`, once absl's handler is on the root logger.

  TensorFlow's Python INFO lines stay out unless `--verbosity` asks for INFO; the command's own stay.
  And each TensorFlow line is printed once: TensorFlow gives its "tensorflow" logger a handler of its
  own when it is imported before absl's is on the root logger (every command imports it first), so
  each of its warnings printed twice, as `WARNING:tensorflow:...` and again as absl's `W...` line.
  """
  root_handlers = logging.getLogger().handlers
  if not root_handlers:
    return  # Nothing else would print TensorFlow's lines.
  tensorflow_logger = logging.getLogger("tensorflow")
  for handler in list(tensorflow_logger.handlers):
    tensorflow_logger.removeHandler(handler)
  if _asks_for_info(argv):
    return
  directories = []
  for package in _TENSORFLOW_PACKAGES:
    spec = importlib.util.find_spec(package)  # Finds, without importing.
    for location in (spec.submodule_search_locations or []) if spec else []:
      directories.append(os.path.join(os.path.realpath(location), ""))
      directories.append(os.path.join(location, ""))
  quiet = _TensorFlowInfoFilter(tuple(directories))
  for handler in root_handlers:
    handler.addFilter(quiet)


def cuda_driver_loads() -> bool:
  """Whether the CUDA driver library loads here, as TensorFlow's CUDA platform would load it."""
  try:
    ctypes.CDLL(CUDA_DRIVER)
  except OSError:
    return False
  return True


def skip_cuda_without_a_driver() -> None:
  """On Linux with no CUDA driver, has TensorFlow register its CPU devices only.

  TensorFlow's Linux wheel is a CUDA build. The first time anything lists devices (any op does),
  its GPU device factory initialises the CUDA platform. Without libcuda.so.1 that fails, and the
  platform logs "failed call to cuInit: ... UNKNOWN ERROR (303)" at ERROR level, on every start
  of every process, whether /usr/local/cuda is installed or not. With no driver there is no GPU
  TensorFlow could use, so leaving the GPU factory unregistered (TF_ENABLED_DEVICE_TYPES=CPU)
  changes nothing but that line. Where the driver loads, nothing is set: a GPU set-up that fails
  still reports it.
  """
  if sys.platform.startswith("linux") and not cuda_driver_loads():
    os.environ.setdefault(TF_DEVICE_TYPES_ENV, CPU_ONLY)


# What the offline tools and the clients raise for a user's mistake (a bad file, line, field or flag
# value), with a message naming it; a data error raised while tf.data reads the logs arrives wrapped in
# TensorFlow's InvalidArgumentError, with the original error's type and message inside its text.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
_WRAPPED_USER_ERROR = re.compile(r"\b(?:" + "|".join(e.__name__ for e in _USER_ERRORS) + r"): ([^\n]+)")


# TensorFlow's errors for a file it could not write, and what their text says when the storage is at fault.
_TF_STORAGE_ERRORS = ("ResourceExhaustedError", "PermissionDeniedError", "FailedPreconditionError", "UnknownError")
_STORAGE_FAILURE = re.compile(
  r"No space left on device|Disk quota exceeded|Read-only file system|Permission denied|is not a directory"
)


def user_error_message(error: BaseException) -> str | None:
  """The one line to show for a user's mistake, or None for any other failure (shown as a traceback)."""
  if isinstance(error, _USER_ERRORS):
    return str(error)
  if type(error).__name__ == "WorkerLost":  # models.distribute's: a peer of a training cluster went away.
    return str(error)
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
    return str(error)  # A full disk is no bug either (a publish names what holds the space: export.versions).
  if type(error).__name__ == "InvalidArgumentError":  # tf.errors, without importing TensorFlow here.
    wrapped = _WRAPPED_USER_ERROR.search(str(error))
    if wrapped:
      return wrapped.group(1).strip()
  if type(error).__name__ in _TF_STORAGE_ERRORS and _STORAGE_FAILURE.search(str(error)):
    # The same, met by a TensorFlow op (a checkpoint or TensorBoard write): a full or read-only disk.
    from models.data import tfrecord  # TensorFlow is loaded: it raised the error.

    return f"cannot write: {tfrecord.tf_error_reason(error)}"
  if type(error).__name__ == "DataLossError":
    # A file that does not decode (a truncated or corrupt TFRecord shard or checkpoint). The readers
    # of fgr-prepare's shards name the shard themselves; this is what reaches here from elsewhere.
    from models.data import tfrecord  # TensorFlow is loaded: it raised the error.

    return (
      f"damaged data: {tfrecord.tf_error_reason(error)} (for fgr-prepare's shards, rerun the same fgr-prepare "
      "command: it rewrites damaged shards)"
    )
  return None


# The status of a process ended by ctrl-C (SIGINT), as shells report it: 128 + the signal's number.
INTERRUPTED_STATUS = 128 + 2


def _debugging(argv: Sequence[str]) -> bool:
  """Whether `--verbosity` asks for debug output (1 or more): tracebacks are shown then."""
  verbosity = early_flags.flag_value(argv[1:], "verbosity", "v")
  return verbosity is not None and verbosity.lstrip("-").isdigit() and int(verbosity) >= 1


def _reporting_user_errors(run: Callable[[], None], argv: Sequence[str]) -> None:
  """Runs a tool; a user's mistake ends it with `<tool>: error: <message>` and status 1,
  not a traceback, unless `--verbosity` asks for debug output (1 or more)."""
  try:
    run()
  except Exception as e:  # pylint: disable=broad-except
    message = user_error_message(e)
    if message is None or _debugging(argv):
      raise
    tool = os.path.basename(argv[0])
    sys.stderr.write(f"{tool}: error: {message}\n({tool} --verbosity=1 shows where it was raised)\n")
    raise SystemExit(1) from None


def _ending_quietly_on_ctrl_c(run: Callable[[], None], argv: Sequence[str]) -> None:
  """Runs a tool; ctrl-C ends it with `<tool>: interrupted` and status 130, as shells expect, rather than
  a KeyboardInterrupt traceback from wherever TensorFlow was (the cleanup on the way out still runs)."""
  try:
    run()
  except KeyboardInterrupt:
    if _debugging(argv):
      raise
    sys.stderr.write(f"\n{os.path.basename(argv[0])}: interrupted\n")
    raise SystemExit(INTERRUPTED_STATUS) from None


def _one_line_usage_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main` with its UsageErrors raised as ValueErrors, which `_reporting_user_errors` says in one line.

  absl prints a UsageError under the usage: for `python -m` the module's docstring and every flag it
  defines (some 80 lines), for a console script a blank line and `USAGE: <path> [flags]`, and the
  message then lacks the `<tool>: error:` every other mistake is reported with.
  """
  from absl import app  # pylint: disable=g-import-not-at-top  # Light: no TensorFlow.

  def main_with_one_line_usage_errors(args: list[str]) -> None:
    try:
      main(args)
    except app.UsageError as e:
      raise ValueError(str(e)) from None

  return main_with_one_line_usage_errors


def _run_absl_main(main: Callable[[list[str]], None], argv: Sequence[str]) -> None:
  """Runs `main` under `app.run` as every command runs: a user's mistake (a UsageError included) in one
  line with status 1, ctrl-C as `interrupted` with status 130; `argv[0]` names the tool in both."""
  from absl import app  # pylint: disable=g-import-not-at-top  # Light: no TensorFlow.

  main = _one_line_usage_errors(main)

  def main_without_tensorflow_info(args: list[str]) -> None:
    quiet_tensorflow_python_logs(argv)
    main(args)

  _ending_quietly_on_ctrl_c(lambda: _reporting_user_errors(lambda: app.run(main_without_tensorflow_info), argv), argv)


def run_module(main: Callable[[list[str]], None]) -> None:
  """Runs the absl `main` of a module started as `python -m <module>` (the benchmarks) as the console
  scripts run theirs: a user's mistake (a bad flag value, a missing path) ends it with
  `python -m <module>: error: <message>` and status 1, ctrl-C with `interrupted` and status 130,
  rather than a traceback. TensorFlow's start-up environment is not set: the module imported it already.
  """
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  argv = [f"python -m {spec.name}" if spec is not None else sys.argv[0], *sys.argv[1:]]  # What errors call it.
  _run_absl_main(main, argv)


# absl's flags that print the main module's flags (`--helpfull` prints every module's anyway).
_HELP_FLAGS = ("help", "?", "helpshort")


def asks_for_help(argv: Sequence[str]) -> bool:
  """Whether `argv` holds `--help` (`-?`) or `--helpshort`, spelt as absl accepts them."""
  return any(arg.startswith("-") and arg.lstrip("-").partition("=")[0] in _HELP_FLAGS for arg in argv[1:])


def list_flags_in_help(module: types.ModuleType) -> None:
  """Has absl's `--help` describe `module`, the command a console script runs.

  `--help` prints the docstring of `__main__` and the flags of the module named sys.argv[0]. For a
  console script, those are the generated wrapper's: no docstring and no flags, so every command's
  `--help` listed nothing (only `python -m <module> --help` did). This lends the wrapper the command's
  docstring and its key flags, when help is asked for only: absl prints the same text above every
  usage error, which stays one line.
  """
  if not asks_for_help(sys.argv):
    return
  from absl import flags  # pylint: disable=g-import-not-at-top  # Light: no TensorFlow.

  main = sys.modules.get("__main__")
  if main is not None and main is not module:
    if not main.__doc__:
      main.__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def _command(
  module: str,
  function: str,
  extra: str | None = None,
  user_errors: bool = False,
  flags_module: str | None = None,
) -> Callable[[], None]:
  """A console script running `module.function`; `extra` names the setup.py extra its third-party
  imports come from, if the plain install lacks them. With `user_errors`, `function` is an absl main,
  run by `app.run`, and a user's mistake is reported in one line (`_reporting_user_errors`), a
  UsageError included. `--help` lists the flags of `flags_module` (by default `module`), which must
  import nothing heavy when it is not `module`."""

  def run() -> None:
    prepare_tensorflow(sys.argv)
    try:
      command = importlib.import_module(module)
    except ModuleNotFoundError as e:
      if extra is None or not e.name or e.name.partition(".")[0] in _OWN_PACKAGES:
        raise
      raise SystemExit(
        f"{os.path.basename(sys.argv[0])} needs the `{extra}` extra ({e.name} is missing): "
        f"pip install 'fullgraph-retrieval[{extra}]'"
      ) from e
    list_flags_in_help(importlib.import_module(flags_module) if flags_module else command)
    entry = getattr(command, function)
    if user_errors:
      _run_absl_main(entry, sys.argv)
    else:
      _ending_quietly_on_ctrl_c(entry, sys.argv)

  run.__doc__ = f"Runs `{module}.{function}` with TensorFlow's start-up environment set first."
  return run


_OWN_PACKAGES = ("cli", "engine", "models", "export", "serving", "clients", "bench")


fgr_prepare = _command("models.data.prepare_cli", "main", user_errors=True)
fgr_train = _command("models.train_cli", "main", user_errors=True)
fgr_eval = _command("export.eval_cli", "main", user_errors=True)
fgr_export = _command("export.export_cli", "main", user_errors=True)
fgr_refresh = _command("export.refresh_cli", "main", user_errors=True)
# Its flags' module imports no TensorFlow: run_server sets the process up before anything does.
fgr_serve = _command("serving.model_servers", "run_server", flags_module="serving.model_servers.server_flags")
fgr_query = _command("clients.query_cli", "main", user_errors=True)
fgr_loadtest = _command("clients.loadtest.loadtest_cli", "main", extra="clients", user_errors=True)
fgr_bench = _command("bench.index_bench", "_main", extra="bench", user_errors=True)
