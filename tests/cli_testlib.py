"""Runs a console script as its installed wrapper does, or a module as `python -m`, in a process of its own.

For tests of what a user sees from a command: its one-line errors, `--help` and exit status, which
come from `cli.launch` and so need a fresh interpreter (absl parses flags once per process).
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_console_script(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs the console script named by argv[0] (e.g. "fgr-export") with argv; output captured as text."""
  entry_point = os.path.basename(argv[0]).replace("-", "_")
  script = f"import sys; sys.argv = {argv!r}; from cli import launch; launch.{entry_point}()"
  return subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    timeout=timeout,
    cwd=REPO_ROOT,
  )


def run_module(module: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `python -m module *args` from the repository; output captured as text."""
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    capture_output=True,
    text=True,
    env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    timeout=timeout,
    cwd=REPO_ROOT,
  )
