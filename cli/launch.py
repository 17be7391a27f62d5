"""Console scripts: each sets TensorFlow's C++ log level, then imports and runs its command.

TensorFlow reads TF_CPP_MIN_LOG_LEVEL once, when its C++ libraries load, and at
its default it prints CUDA, oneDNN and CPU-feature notices on every start: half
of `make demo`'s output was those lines. The level has to be set before the
command's module imports TensorFlow, hence this launcher, which imports nothing
heavy itself. absl's `--verbosity` (`-v`) of 0 (INFO) or more brings the lines
back; a TF_CPP_MIN_LOG_LEVEL already in the environment is left as it is.
"""

import importlib
import os
import sys
from collections.abc import Callable, Sequence

from cli import early_flags

TF_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
# TensorFlow's C++ levels: 0 logs everything, 1 drops INFO, 2 drops WARNING too.
ALL_LOGS = "0"
WARNINGS_AND_ERRORS = "1"


def set_tensorflow_log_level(argv: Sequence[str]) -> None:
  """Keeps TensorFlow's C++ INFO lines out unless `--verbosity` asks for INFO."""
  verbosity = early_flags.flag_value(argv[1:], "verbosity", "v")
  try:
    verbose = verbosity is not None and int(verbosity) >= 0
  except ValueError:
    verbose = False  # absl reports the bad value itself.
  os.environ.setdefault(TF_LOG_LEVEL_ENV, ALL_LOGS if verbose else WARNINGS_AND_ERRORS)


def _command(module: str, function: str = "run", extra: str | None = None) -> Callable[[], None]:
  """A console script running `module.function`; `extra` names the setup.py extra its third-party
  imports come from, if the plain install lacks them."""

  def run() -> None:
    set_tensorflow_log_level(sys.argv)
    try:
      command = importlib.import_module(module)
    except ModuleNotFoundError as e:
      if extra is None or not e.name or e.name.partition(".")[0] in _OWN_PACKAGES:
        raise
      raise SystemExit(
        f"{os.path.basename(sys.argv[0])} needs the `{extra}` extra ({e.name} is missing): "
        f"pip install 'fullgraph-retrieval[{extra}]'"
      ) from e
    getattr(command, function)()

  run.__doc__ = f"Runs `{module}.{function}` with TensorFlow's C++ log level set first."
  return run


_OWN_PACKAGES = ("cli", "engine", "models", "export", "serving", "clients", "bench")


fgr_train = _command("models.train_cli")
fgr_eval = _command("models.eval_cli")
fgr_export = _command("export.export_cli")
fgr_refresh = _command("export.refresh_cli")
fgr_serve = _command("serving.model_servers", "run_server")
fgr_query = _command("clients.query_cli")
fgr_loadtest = _command("clients.loadtest.loadtest_cli", extra="clients")
fgr_bench = _command("bench.index_bench", extra="bench")
