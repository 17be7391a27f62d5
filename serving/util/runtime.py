"""Process tuning that keeps request latency flat while model versions swap."""

import ctypes
import ctypes.util
import gc

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


def retain_freed_memory_unless_disabled(argv: list) -> bool:
  """`retain_freed_memory()` unless `argv` turns --retain_freed_memory off
  (the last of --retain_freed_memory / --noretain_freed_memory wins, as in absl).

  For fgr-serve's entry points, before TensorFlow is imported: threads that
  malloc before mallopt(M_ARENA_MAX) get arenas of their own, and large
  blocks of those arenas are mmap'd and returned to the system whatever the
  settings. The flag parser runs too late for that, so argv is read here.
  """
  given = [arg for arg in argv if arg.split("=")[0] in ("--retain_freed_memory",
                                                        "--noretain_freed_memory")]
  if given and given[-1] in _DISABLING_ARGS:
    return False
  return retain_freed_memory()


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
  swaps. Call before any thread starts (see
  `retain_freed_memory_unless_disabled`).

  On by default in fgr-serve, with a cost under load: protobuf's Python
  runtime (upb) calls malloc_trim(0) every 10,000 message-arena frees, every
  1-2 s at 200 QPS, in whichever thread frees a request or response, with the
  GIL held. After a swap, that trim finds the unloaded version's ~300 MB (1M
  ads) free in this heap and hands it back page by page, holding malloc's
  only arena: 10-45 ms stalls of every request. Off, loads touch fresh pages
  instead, which cost more on this VM; side by side, off was not better
  (docs/benchmarks.md, 2026-12-02). Nor was keeping it on with protobuf's
  trims made no-ops (a preloaded malloc_trim): its restores stalled requests
  more, and it met the swap target less often (same page, from 06:23 UTC).

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
