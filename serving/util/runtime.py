"""Process tuning that keeps request latency flat while model versions swap."""

import ctypes
import ctypes.util
import gc
import importlib.util
import os
import sys

from absl import logging

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_ABOVE = 2**31 - 1  # mallopt takes an int: only a free heap top over 2 GiB is trimmed.


def freeze_gc() -> None:
  """Moves every object alive now (modules, TF's registries) out of the GC's
  reach, so later full collections only traverse what was created since.

  Measured with a 1M-ad ScaNN model on 2 cores (bench/load_stalls.py): the
  full collection that frees an unloaded version holds the GIL while it
  traverses the ~300k objects TensorFlow's import leaves behind, and requests
  to the other version reached a p99 of 112 ms; after `freeze_gc()` at
  start-up, 7 ms. Call it once, after imports and
  before the first model loads: objects frozen here are never collected, so
  nothing that is later thrown away (a version's graph) may be alive then.
  """
  gc.collect()
  gc.freeze()
  logging.info("Froze %d start-up objects out of the garbage collector",
               gc.get_freeze_count())


def _libc():
  """glibc through ctypes, or None where it is not the C library."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "mallopt") else None
  except OSError:
    return None


_retained = False
_DISABLING_ARGS = ("--noretain_freed_memory", "--retain_freed_memory=false",
                   "--retain_freed_memory=0", "--retain_freed_memory=False")
# The no-op malloc_trim (serving/util/notrim.c), built by setup.py where a C
# compiler is available. It is only ever preloaded, never imported.
_NO_TRIM_MODULE = "serving.util._notrim"
_NO_TRIM_MARKER = "fgr_malloc_trim_calls_skipped"
_NO_TRIM_EXEC_ENV = "FGR_SERVE_NO_TRIM_EXEC"  # Set on the re-exec: it is tried once.


def prepare_server_process(argv: list) -> None:
  """fgr-serve's process set-up, for its entry points before TensorFlow's
  import: with --retain_freed_memory (the default), re-executes the process
  with malloc_trim skipped (`exec_with_malloc_trim_skipped`), then
  `retain_freed_memory()`.

  Threads that malloc before mallopt(M_ARENA_MAX) get arenas of their own,
  and large blocks of those arenas are mmap'd and returned to the system
  whatever the settings. The flag parser runs too late for that, so argv is
  read here.
  """
  if retain_requested(argv):
    exec_with_malloc_trim_skipped()
    retain_freed_memory()


def retain_requested(argv: list) -> bool:
  """Whether `argv` leaves --retain_freed_memory on (its default): the last of
  --retain_freed_memory / --noretain_freed_memory wins, as in absl."""
  given = [arg for arg in argv if arg.split("=")[0] in ("--retain_freed_memory",
                                                        "--noretain_freed_memory")]
  return not (given and given[-1] in _DISABLING_ARGS)


def no_trim_library() -> str | None:
  """Path of the built no-op malloc_trim library, or None if it was not built."""
  spec = importlib.util.find_spec(_NO_TRIM_MODULE)
  return spec.origin if spec is not None else None


def malloc_trim_calls_skipped() -> int | None:
  """Calls to malloc_trim the preloaded no-op has answered in this process, or
  None if malloc_trim is glibc's."""
  try:
    return ctypes.c_ulong.in_dll(ctypes.CDLL(None), _NO_TRIM_MARKER).value
  except (OSError, ValueError):
    return None


def exec_with_malloc_trim_skipped() -> None:
  """Re-executes this process (same pid, arguments and environment) with the
  no-op malloc_trim of serving/util/notrim.c preloaded, so that no library
  hands the heap that `retain_freed_memory()` keeps back to the kernel.

  The caller that matters is protobuf's Python runtime (upb): it calls
  malloc_trim(0) after every 10,000 message-arena frees, every 1-2 s at
  200 QPS, on the request path with the GIL held. After a swap, that trim
  finds the unloaded version's ~300 MB (1M ads) free in the heap and returns
  it page by page, holding malloc's only arena: every request stalls 10-60 ms,
  and the next version touches fresh pages again. A preloaded definition is
  the only way to reach it: upb calls glibc's directly, and glibc has no
  setting that turns trimming off.

  Returns without re-executing when the no-op is already in place (then it
  drops itself from LD_PRELOAD, so child processes get glibc's), when it was
  not built (no C compiler at install) or when an earlier re-exec did not
  take; the last two are logged as warnings.
  """
  library = no_trim_library()
  if malloc_trim_calls_skipped() is not None:
    others = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and p != library]
    if others:
      os.environ["LD_PRELOAD"] = ":".join(others)
    else:
      os.environ.pop("LD_PRELOAD", None)
    os.environ.pop(_NO_TRIM_EXEC_ENV, None)
    logging.info("malloc_trim is a no-op in this process (%s)", library)
    return
  if library is None or not sys.executable or not sys.platform.startswith("linux"):
    logging.warning("protobuf's periodic malloc_trim stays on: the no-op library "
                    "(serving/util/notrim.c) was not built; reinstall with a C compiler")
    return
  if os.environ.get(_NO_TRIM_EXEC_ENV):
    logging.warning("protobuf's periodic malloc_trim stays on: LD_PRELOAD=%s did not "
                    "take effect", library)
    return
  preloaded = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
  env = dict(os.environ, LD_PRELOAD=":".join([library, *preloaded]), **{_NO_TRIM_EXEC_ENV: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def freed_memory_retained() -> bool:
  """Whether `retain_freed_memory()` succeeded in this process."""
  return _retained


def retain_freed_memory() -> bool:
  """Keeps memory freed by an unloaded version in the process for the next one.

  glibc gives every large block (a version's variables, ScaNN's searcher:
  ~650 MB at 1M ads) its own mmap and returns it to the kernel when freed, so
  each new version touches fresh pages. On a VM that hands freed pages back
  to the host (virtio-balloon free page reporting, as on this machine), that
  first touch stalls the vCPU whatever the thread's priority: 0.4-0.9 s per
  360 MB instead of 50 ms, and requests to the serving version stall with it.
  With one malloc arena, no mmap'd blocks and no trimming below 2 GiB, freed
  blocks stay in the heap and the next version reuses them; the process then
  holds its peak (two versions during a swap) rather than shrinking between
  swaps. Call before any thread starts (see `prepare_server_process`), and
  in fgr-serve after `exec_with_malloc_trim_skipped()`: mallopt cannot stop
  callers of malloc_trim (protobuf's) from returning the kept memory.

  Returns False (and changes nothing) where glibc's mallopt is unavailable.
  """
  libc = _libc()
  if libc is None:
    logging.info("mallopt unavailable: freed memory goes back to the system")
    return False
  libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  global _retained
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_ABOVE)))
  _retained = ok
  logging.info("Freed memory stays in the process for the next version: %s", ok)
  return ok
