"""Console scripts keep TensorFlow's C++ start-up lines out unless --verbosity asks."""

import os
import re
import subprocess
import sys

import pytest

from cli import early_flags, launch

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
  assert "USAGE: fgr-eval" in result.stdout, result.stderr[-3000:]  # The command ran (absl's --helpshort).
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
