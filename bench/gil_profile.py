"""Reading `py-spy record --gil` profiles of fgr-serve: which code held the GIL, from sampled stacks.

Kept apart from the benchmark (bench/serving_profile.py) so that it needs neither flags nor a server.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SERVING_DIR = os.path.join(REPO, "serving") + os.sep


def _frame_file(frame: str) -> str:
  """'function (/path/file.py)' -> '/path/file.py' (py-spy's raw format with --nolineno)."""
  return frame[frame.rfind("(") + 1 : -1] if frame.endswith(")") else ""


def _library_path(path: str) -> str:
  """A library file's path from its package root: '.../site-packages/grpc/aio/_call.py' -> 'grpc/aio/_call.py'."""
  match = re.search(r"site-packages/(.+)$", path) or re.search(r"python3\.\d+/(.+)$", path)
  return match.group(1) if match else os.path.basename(path)


def charge(stack: list[str]) -> str:
  """Where a sampled stack's time goes: its innermost fgr-serve function, else its innermost frame.

  Native code (TensorFlow's C++, gRPC's Cython) has no Python frame, so its time is charged to the
  Python function that called it: `Handle._run (asyncio/events.py)` with nothing above it is the event
  loop running a callback of gRPC's aio layer (Cython), outside any fgr-serve code.
  """
  for frame in reversed(stack):
    path = _frame_file(frame)
    if path.startswith(_SERVING_DIR):
      module = os.path.splitext(os.path.relpath(path, REPO))[0].replace(os.sep, ".")
      return f"{module}.{frame[: frame.rfind(' (')]}"
  if not stack:
    return "(no Python frame)"
  leaf = stack[-1]
  return f"{leaf[: leaf.rfind(' (')]} ({_library_path(_frame_file(leaf))}), no fgr-serve frame"


def breakdown(raw_lines: Iterable[str]) -> tuple[int, collections.Counter]:
  """Total samples and samples per charge(), from py-spy's raw (collapsed-stack) output."""
  charged: collections.Counter = collections.Counter()
  for line in raw_lines:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
      continue
    # The root frame names the process ('process 123:"python -m ..."'); keep the Python frames.
    charged[charge([f for f in stack.split(";") if not f.startswith("process ")])] += int(count)
  return sum(charged.values()), charged


def py_spy() -> str | None:
  """py-spy of this interpreter's environment (a venv's bin/ need not be on PATH), else PATH's."""
  beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
  return beside if os.access(beside, os.X_OK) else shutil.which("py-spy")


def record(pid: int, seconds: float, output: str, rate: int, native: bool = False) -> subprocess.Popen:
  """Starts `py-spy record --gil` of process `pid` for `seconds`, writing raw stacks to `output`."""
  # py-spy reads native stacks only from a paused process; Python stacks are read without pausing it.
  sampling = ["--native"] if native else ["--nonblocking"]
  return subprocess.Popen(
    [
      py_spy(),
      "record",
      "--pid",
      str(pid),
      "--gil",
      *sampling,
      "--nolineno",
      "--full-filenames",
      "--format",
      "raw",
      "--rate",
      str(rate),
      "--duration",
      str(int(seconds)),
      "--output",
      output,
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
