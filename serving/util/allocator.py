"""fgr-serve's memory allocator: mimalloc, preloaded by re-executing the process once.

Why not glibc's malloc (docs/history/benchmarks-2026-11.md, "fgr-serve under mimalloc"): a
version swap allocates and frees ~650 MB (1M ads) while requests run. Under
glibc, with freed memory kept for the next version (one arena, see
`runtime.retain_freed_memory`), the load thread and the request threads queue
on that arena's lock, and protobuf's periodic malloc_trim(0) hands the
unloaded version's memory back in the middle of requests. mimalloc gives each
thread its own heap and has no malloc_trim, so neither happens; with purging
off it keeps freed pages for the next version as well.

A preloaded allocator is the only way to replace malloc for TensorFlow's,
ScaNN's and protobuf's C++ code alike, and LD_PRELOAD is read only when a
process starts: hence the re-exec, with the same pid and arguments.
"""

import ctypes
import importlib.metadata
import os
import sys

from absl import logging

from cli import early_flags

MIMALLOC = "mimalloc"
SYSTEM = "system"
CHOICES = (MIMALLOC, SYSTEM)
_DISTRIBUTION = "cmeel-mimalloc"  # mimalloc's shared library as a wheel on PyPI.
_EXEC_MARKER = "FGR_SERVE_ALLOCATOR_EXEC"  # Set on the re-exec, so it is tried once.
# mimalloc's own setting: never return freed pages to the OS (-1), so the next
# version reuses them, as `runtime.retain_freed_memory` does for glibc.
_PURGE_DELAY_ENV = "MIMALLOC_PURGE_DELAY"
_NEVER_PURGE = "-1"


def requested(argv: list) -> str:
  """The --allocator value in `argv` (the last one wins, as in absl), read
  before absl parses flags: the re-exec has to come before TensorFlow's import."""
  return early_flags.flag_value(argv, "allocator") or MIMALLOC


def mimalloc_library() -> str | None:
  """Path of the installed libmimalloc shared library, or None."""
  try:
    files = importlib.metadata.distribution(_DISTRIBUTION).files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in files:
    if file.name.startswith("libmimalloc.so"):
      path = str(file.locate())
      if os.path.isfile(path):
        return os.path.realpath(path)
  return None


def mimalloc_active() -> bool:
  """Whether mimalloc serves this process's malloc (its symbols are loaded)."""
  return hasattr(ctypes.CDLL(None), "mi_version")


def freed_pages_kept() -> bool:
  """Whether the active mimalloc keeps freed pages rather than purging them."""
  return mimalloc_active() and os.environ.get(_PURGE_DELAY_ENV) == _NEVER_PURGE


def exec_under_mimalloc(keep_freed_pages: bool) -> None:
  """Re-executes this process (same pid, arguments and environment) with
  mimalloc preloaded; with `keep_freed_pages`, mimalloc never purges (unless
  MIMALLOC_PURGE_DELAY is set already).

  Returns without re-executing when mimalloc is active already (it then leaves
  LD_PRELOAD as the caller had it, so child processes get the system's
  malloc), and with a warning where it cannot be: not Linux, no
  cmeel-mimalloc installed, or an earlier re-exec that did not take.
  """
  library = mimalloc_library()
  if mimalloc_active():
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and p != library]
    if preloaded:
      os.environ["LD_PRELOAD"] = ":".join(preloaded)
    else:
      os.environ.pop("LD_PRELOAD", None)
    os.environ.pop(_EXEC_MARKER, None)
    return
  if not sys.platform.startswith("linux") or library is None or not sys.executable:
    logging.warning(
      "fgr-serve runs on the system's malloc: mimalloc (pip package %s) is not installed or not for this platform",
      _DISTRIBUTION,
    )
    return
  if os.environ.get(_EXEC_MARKER):
    logging.warning("fgr-serve runs on the system's malloc: LD_PRELOAD=%s did not take effect", library)
    return
  env = dict(os.environ, **{_EXEC_MARKER: "1"})
  env["LD_PRELOAD"] = ":".join([library, *(p for p in env.get("LD_PRELOAD", "").split(":") if p)])
  if keep_freed_pages:
    env.setdefault(_PURGE_DELAY_ENV, _NEVER_PURGE)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
