"""tools/demo.py replaces only an earlier demo's output, and a SIGTERM stops the tool it is running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "tools", "demo.py")
ENV = dict(os.environ, PYTHONPATH=REPO_ROOT)


def _demo(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, DEMO, *flags], capture_output=True, text=True, timeout=120, env=ENV)


def test_a_directory_holding_other_files_is_left_as_it_is(tmp_path):
  """The demo removed --output_dir whatever it held: `--output_dir=.` or a typo naming a run deleted it."""
  (tmp_path / "notes.txt").write_text("mine")
  (tmp_path / "train.log").write_text("an earlier demo's")
  result = _demo(f"--output_dir={tmp_path}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    f"demo: --output_dir={tmp_path} holds files the demo did not write (notes.txt); it replaces only an earlier "
    "demo's output: name a new or empty directory"
  )
  assert sorted(os.listdir(tmp_path)) == ["notes.txt", "train.log"]


def test_a_file_is_no_output_dir(tmp_path):
  (tmp_path / "out").write_text("")
  result = _demo(f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 1 and "is a file; name a directory" in result.stderr


_STOPPED_MID_STEP = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("demo", {demo!r})
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)
demo.BIN = {bin!r}
demo._exit_on_sigterm()
demo._run(["fgr-train"], {log!r})
"""


def test_sigterm_stops_the_tool_the_demo_is_running(tmp_path):
  """Python's default SIGTERM ended the demo alone: its fgr-train (or fgr-serve) went on, writing into
  the output directory a rerun of the demo then wrote into too."""
  bin_dir, pid_file = tmp_path / "bin", tmp_path / "tool.pid"
  bin_dir.mkdir()
  tool = bin_dir / "fgr-train"
  tool.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
  tool.chmod(0o755)
  script = _STOPPED_MID_STEP.format(demo=DEMO, bin=str(bin_dir), log=str(tmp_path / "train.log"))
  demo = subprocess.Popen([sys.executable, "-c", script], env=ENV, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while not (pid_file.exists() and pid_file.read_text().strip()) and time.time() < deadline:
    time.sleep(0.1)
  tool_pid = int(pid_file.read_text())
  demo.send_signal(signal.SIGTERM)
  assert demo.wait(timeout=60) == 128 + signal.SIGTERM, demo.stderr.read()
  try:
    os.kill(tool_pid, 0)
    left_running = True
    os.kill(tool_pid, signal.SIGKILL)
  except ProcessLookupError:
    left_running = False
  assert not left_running
