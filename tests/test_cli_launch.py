"""Console scripts keep TensorFlow's C++ start-up lines out unless --verbosity asks."""

import os
import re
import subprocess
import sys

import pytest

from cli import early_flags, launch
from tests import cli_testlib
from tests.data import logs_testlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A TensorFlow C++ log line at INFO: "2026-12-03 08:23:16.959171: I tensorflow/...".
TF_INFO_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+: I ", re.MULTILINE)
# One at any level, e.g. "...: E external/local_xla/.../cuda_platform.cc:51] failed call to cuInit: ...".
TF_ANY_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+: [IWEF] ", re.MULTILINE)


@pytest.mark.parametrize(
  "argv, expected",
  [
    ([], None),
    (["--allocator=system"], "system"),
    (["-allocator", "system"], "system"),
    (["--allocator=system", "--allocator", "mimalloc"], "mimalloc"),  # The last one wins.
    (["--allocator"], None),  # No value after it: absl reports that itself.
    (["--allocator_extra=1"], None),
  ],
)
def test_flag_value_reads_argv_as_absl_does(argv, expected):
  assert early_flags.flag_value(argv, "allocator") == expected


@pytest.mark.parametrize(
  "argv, level",
  [
    (["fgr-eval"], launch.WARNINGS_AND_ERRORS),
    (["fgr-eval", "--verbosity=-1"], launch.WARNINGS_AND_ERRORS),
    (["fgr-eval", "--verbosity=0"], launch.ALL_LOGS),
    (["fgr-eval", "-v", "1"], launch.ALL_LOGS),
    (["fgr-eval", "--v=bad"], launch.WARNINGS_AND_ERRORS),
  ],
)
def test_log_level_follows_verbosity(monkeypatch, argv, level):
  monkeypatch.delenv(launch.TF_LOG_LEVEL_ENV, raising=False)
  launch.set_tensorflow_log_level(argv)
  assert os.environ[launch.TF_LOG_LEVEL_ENV] == level


def test_a_level_set_by_the_caller_is_kept(monkeypatch):
  monkeypatch.setenv(launch.TF_LOG_LEVEL_ENV, "3")
  launch.set_tensorflow_log_level(["fgr-eval", "--verbosity=1"])
  assert os.environ[launch.TF_LOG_LEVEL_ENV] == "3"


@pytest.mark.parametrize("driver, expected", [(False, launch.CPU_ONLY), (True, None)])
def test_only_cpu_devices_without_a_cuda_driver(monkeypatch, driver, expected):
  monkeypatch.delenv(launch.TF_DEVICE_TYPES_ENV, raising=False)
  monkeypatch.setattr(launch.sys, "platform", "linux")
  monkeypatch.setattr(launch, "cuda_driver_loads", lambda: driver)
  launch.skip_cuda_without_a_driver()
  assert os.environ.get(launch.TF_DEVICE_TYPES_ENV) == expected


def test_device_types_set_by_the_caller_are_kept(monkeypatch):
  monkeypatch.setenv(launch.TF_DEVICE_TYPES_ENV, "CPU,GPU")
  monkeypatch.setattr(launch, "cuda_driver_loads", lambda: False)
  launch.skip_cuda_without_a_driver()
  assert os.environ[launch.TF_DEVICE_TYPES_ENV] == "CPU,GPU"


@pytest.mark.skipif(launch.cuda_driver_loads(), reason="with a CUDA driver, what cuInit logs depends on the GPUs")
def test_without_a_cuda_driver_running_ops_logs_nothing():
  env = {k: v for k, v in os.environ.items() if k not in (launch.TF_LOG_LEVEL_ENV, launch.TF_DEVICE_TYPES_ENV)}
  env["PYTHONPATH"] = REPO_ROOT
  script = (
    "from cli import launch; launch.prepare_tensorflow(['fgr-eval']); import tensorflow as tf; "
    "print(tf.config.list_physical_devices('GPU'), float(tf.reduce_sum(tf.ones([3]))))"
  )
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT
  )
  assert result.stdout.strip() == "[] 3.0", result.stderr[-3000:]
  assert not TF_ANY_LINE.search(result.stderr), result.stderr[-3000:]


def test_a_console_script_prints_no_tensorflow_info_lines():
  env = {k: v for k, v in os.environ.items() if k != launch.TF_LOG_LEVEL_ENV}
  env["PYTHONPATH"] = REPO_ROOT
  script = "import sys; from cli import launch; sys.argv = ['fgr-eval', '--helpshort']; launch.fgr_eval()"
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT
  )
  assert "--model_path" in result.stdout, result.stderr[-3000:]  # The command ran (absl's --helpshort).
  assert not TF_INFO_LINE.search(result.stderr), result.stderr[-3000:]


def test_a_missing_extra_is_named(monkeypatch):
  def import_module(name):
    raise ModuleNotFoundError(f"No module named 'hdrh' (importing {name})", name="hdrh")

  monkeypatch.setattr(launch.importlib, "import_module", import_module)
  monkeypatch.setattr(sys, "argv", ["/venv/bin/fgr-loadtest"])
  with pytest.raises(
    SystemExit,
    match=r"fgr-loadtest needs the `clients` extra \(hdrh is missing\): "
    r"pip install 'fullgraph-retrieval\[clients\]'",
  ):
    launch.fgr_loadtest()


class InvalidArgumentError(Exception):
  """Stands for tf.errors.InvalidArgumentError, which the launcher recognises by name."""


class DataLossError(Exception):
  """Stands for tf.errors.DataLossError: a file that does not decode."""


@pytest.mark.parametrize(
  "error, message",
  [
    (ValueError("events.jsonl:3: 'timestamp' must be a number"), "events.jsonl:3: 'timestamp' must be a number"),
    (FileNotFoundError("runs/x is not a run"), "runs/x is not a run"),
    (FileExistsError("Version 1 already exists at m/1"), "Version 1 already exists at m/1"),
    (
      InvalidArgumentError("{{function_node x}} ValueError: events.jsonl:2: unknown ad_id 'zz'\nTraceback ..."),
      "events.jsonl:2: unknown ad_id 'zz'",
    ),
    (InvalidArgumentError("Matrix size-incompatible"), None),  # A failure of the tool, not of the data.
    (
      DataLossError(
        "Graph execution error:\n\nDetected at node IteratorGetNext defined at (most recent call last):\n"
        '  File "train.py", line 3, in fit\n\ninflate() failed with error -3: incorrect data check\n'
        "\t [[{{node IteratorGetNext}}]] [Op:__inference_train_function_123]"
      ),
      "damaged data: inflate() failed with error -3: incorrect data check (for fgr-prepare's shards, rerun the "
      "same fgr-prepare command: it rewrites damaged shards)",
    ),
    (KeyError("row"), None),
    # fgr-refresh --delta=<a directory>, and a full disk: the environment, not a bug of the tool.
    (IsADirectoryError(21, "Is a directory", "d.jsonl"), "[Errno 21] Is a directory: 'd.jsonl'"),
    (OSError(28, "No space left on device", "m/1"), "[Errno 28] No space left on device: 'm/1'"),
    (OSError(5, "Input/output error"), None),
  ],
)
def test_user_errors_are_told_apart(error, message):
  assert launch.user_error_message(error) == message


def test_a_user_error_ends_the_tool_in_one_line_unless_debugging(capsys):
  def bad_data():
    raise ValueError("items.jsonl:4: 'category' must be a string, got 7")

  with pytest.raises(SystemExit) as info:
    launch._reporting_user_errors(bad_data, ["/venv/bin/fgr-train", "--data=logs"])
  assert info.value.code == 1
  lines = capsys.readouterr().err.splitlines()
  assert lines[0] == "fgr-train: error: items.jsonl:4: 'category' must be a string, got 7"
  assert "--verbosity=1" in lines[1] and len(lines) == 2
  with pytest.raises(ValueError, match="category"):  # Debugging: the traceback as before.
    launch._reporting_user_errors(bad_data, ["fgr-train", "--verbosity=1"])

  def bug():
    raise RuntimeError("a bug")

  with pytest.raises(RuntimeError):
    launch._reporting_user_errors(bug, ["fgr-train"])


def test_bad_events_read_by_tf_data_end_fgr_train_in_one_line(tmp_path):
  """Every event is checked when the logs are opened, before tf.data reads them (from inside it, the
  error was ~90 lines of InvalidArgumentError and TensorFlow's own warning): the tool ends with the
  file, line and field only."""
  data_dir = str(tmp_path / "logs")
  logs_testlib.write_tiny_logs(data_dir)
  events = os.path.join(data_dir, "events.jsonl")
  with open(events) as f:
    lines = f.read().splitlines()
  lines[40] = lines[40].replace('"ad_id": "a0"', '"ad_id": "no-such-ad"')
  with open(events, "w") as f:
    f.write("\n".join(lines) + "\n")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  script = "from cli import launch; launch.fgr_train()"
  argv = ["fgr-train", "--data=logs", f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'run'}", "--epochs=1"]
  result = subprocess.run(
    [sys.executable, "-c", f"import sys; sys.argv = {argv!r}; {script}"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    cwd=REPO_ROOT,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  ours = [line for line in result.stderr.splitlines() if line.lstrip("(").startswith("fgr-train")]
  assert re.fullmatch(r"fgr-train: error: .*events\.jsonl:41: ad_id 'no-such-ad' is not in items\.jsonl", ours[0]), ours
  assert len(ours) == 2 and "--verbosity=1" in ours[1], result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "InvalidArgumentError" not in result.stderr, result.stderr[-3000:]


def test_fgr_export_into_an_existing_version_fails_before_building(tmp_path):
  """It built and saved the whole graph first, then ended in a FileExistsError traceback."""
  os.makedirs(tmp_path / "models" / "1")
  argv = ["fgr-export", f"--checkpoint_dir={tmp_path / 'no-run'}", f"--model_base_path={tmp_path / 'models'}"]
  argv.append("--version=1")
  result = cli_testlib.run_console_script(argv)
  assert result.returncode == 1, result.stderr[-3000:]
  assert f"fgr-export: error: Version 1 already exists at {tmp_path / 'models' / '1'}" in result.stderr
  assert "Traceback" not in result.stderr


def test_a_flag_conflict_ends_a_console_script_as_every_other_mistake(tmp_path):
  """A UsageError from main() printed a blank line and `USAGE: <path> [flags]` above the bare message,
  without the `fgr-export: error:` other mistakes carry."""
  argv = ["fgr-export", "--exclusion_depth=5", f"--checkpoint_dir={tmp_path}", f"--model_base_path={tmp_path / 'm'}"]
  result = cli_testlib.run_console_script(argv)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "fgr-export: error: --exclusion_depth: only with --exclude_history" in result.stderr
  assert "USAGE:" not in result.stderr, result.stderr[-3000:]


_SAVING_SCRIPT = """
import os, sys, tempfile
import tensorflow as tf
import tf_keras
from absl import logging
from cli import launch
from engine import full_graph

def main(argv):
  logging.info("own info line")
  tf.compat.v1.logging.warning("a tensorflow warning")
  module = tf.Module()
  module.layer = tf_keras.layers.Dense(2)  # Never called: tf-keras warns it is "not built".
  module.double = tf.function(lambda x: x * 2, input_signature=[tf.TensorSpec([None], tf.float32)])
  with full_graph.without_keras_layer_notices():
    tf.saved_model.save(module, os.path.join(tempfile.mkdtemp(), "m"))

launch._run_absl_main(main, ["probe", *sys.argv[1:]])
"""


@pytest.mark.parametrize("verbosity", [None, "0"])
def test_tensorflow_python_info_lines_follow_verbosity_and_each_line_prints_once(tmp_path, verbosity):
  script = tmp_path / "probe.py"
  script.write_text(_SAVING_SCRIPT)
  argv = [sys.executable, str(script)] + ([f"--verbosity={verbosity}"] if verbosity else [])
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.count("own info line") == 1, result.stderr[-3000:]
  # TensorFlow's logger had a handler of its own beside absl's: its warnings printed twice.
  assert result.stderr.count("a tensorflow warning") == 1, result.stderr[-3000:]
  assert "Skipping full serialization" not in result.stderr, result.stderr[-3000:]
  # The SavedModel writer's INFO lines ("Assets written to: ...") only when --verbosity asks for INFO.
  assert ("Assets written to" in result.stderr) == (verbosity is not None), result.stderr[-3000:]
