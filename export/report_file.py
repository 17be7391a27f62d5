"""Where an offline tool's JSON report goes: stdout, and a file checked before the work starts.

fgr-eval evaluates for minutes; a --report_file that cannot be written should stop it first, and a
write that fails anyway must not lose the report.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sys
from typing import Any


def _finite(value: Any) -> Any:
  """`value` with every float that is NaN or infinite, at any depth, replaced by None."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {key: _finite(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(item) for item in value]
  return value


def to_json(report: dict[str, Any]) -> str:
  """The report as standard JSON: a metric with nothing to measure (the conversion coverage of examples
  without a conversion: NaN) is null. Python's json writes NaN, which jq, JavaScript and most JSON
  readers refuse, so one empty metric made the whole report unreadable to them."""
  return json.dumps(_finite(report), indent=2, allow_nan=False)


def check(path: str, make_directory: bool = False) -> None:
  """Raises, naming --report_file, unless a report can be written at `path`: checked before evaluating.

  With `make_directory` (the benchmarks, whose output directories are theirs), a missing directory is
  made rather than refused.
  """
  directory = os.path.dirname(os.path.abspath(path))
  if make_directory and not os.path.lexists(directory):
    os.makedirs(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"--report_file={path}: the directory {directory} does not exist")
  if os.path.isdir(path):
    raise ValueError(f"--report_file={path} is a directory; name a file")
  if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise PermissionError(f"--report_file={path}: not writable")


def publish(text: str, report_file: str) -> None:
  """Prints the report, then writes it to `report_file` (if any) whole (`write_atomically`).

  Printed first, so that a write failing after the whole evaluation still leaves the report.
  """
  print(text)
  sys.stdout.flush()
  if report_file:
    write_atomically(report_file, text + "\n")


def write_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` whole and durably: readers and a crash see the old file or the new one.

  The text goes to a temporary file of a unique name in the same directory (so the rename stays on
  one file system), is fsync'd, then renamed over `path`, and the directory is fsync'd so the rename
  survives a crash too. A fixed temporary name raced: two runs writing the same report truncated
  each other's temporary file, and the second rename failed (FileNotFoundError). A temporary file
  left by a write that failed is deleted.
  """
  directory = os.path.dirname(os.path.abspath(path))
  temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
  # Mode 0666 less the umask, as open(path, "w") creates a file (mkstemp's is 0600, and reading the
  # umask means setting it, for every thread of the process).
  fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temp)
    raise
  directory_fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(directory_fd)
  finally:
    os.close(directory_fd)
