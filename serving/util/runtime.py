"""Process tuning for fgr-serve, set before TensorFlow loads: its kernels, and flat latency while versions swap."""

import ctypes
import ctypes.util
import gc
import os

from absl import logging

from cli import early_flags
from serving.util import allocator

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_ABOVE = 2**31 - 1  # mallopt takes an int: only a free heap top over 2 GiB is trimmed.


def freeze_gc() -> None:
  """Moves every object alive now (modules, TF's registries) out of the GC's
  reach, so later full collections only traverse what was created since.

  The full collection that frees an unloaded version holds the GIL while it
  traverses the objects TensorFlow's import leaves behind, stalling requests
  to the other version (bench/load_stalls.py; figures in
  docs/history/benchmarks-2026-11.md). Call it once, after imports and
  before the first model loads: objects frozen here are never collected, so
  nothing that is later thrown away (a version's graph) may be alive then.
  """
  gc.collect()
  gc.freeze()
  logging.info("Froze %d start-up objects out of the garbage collector", gc.get_freeze_count())


def _libc():
  """glibc through ctypes, or None where it is not the C library."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "mallopt") else None
  except OSError:
    return None


_retained = False


# TensorFlow's switch for the oneDNN kernels of its x86 wheel, read once when its libraries load.
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def use_eigen_kernels() -> None:
  """Has TensorFlow run its Eigen kernels rather than oneDNN's, unless TF_ENABLE_ONEDNN_OPTS is set.

  TensorFlow's x86 wheel turns oneDNN on by itself on CPUs with AVX-512 VNNI or BF16 or AMX, and
  rewrites matmuls and their neighbours into oneDNN kernels. Their fixed cost per call dominates at
  serving's few rows a call: with Eigen's, the served 100k-ad model took a quarter less time at batch
  1, and a self-attention query tower half (docs/performance.md, Tuning). `TF_ENABLE_ONEDNN_OPTS=1`
  in fgr-serve's environment brings oneDNN back. Call before TensorFlow's import.
  """
  os.environ.setdefault(ONEDNN_ENV, "0")


def prepare_server_process(argv: list) -> None:
  """fgr-serve's process set-up, for its entry points before TensorFlow's
  import: `use_eigen_kernels()`; with --allocator=mimalloc (the default)
  re-executes the process under mimalloc (`allocator.exec_under_mimalloc`),
  then, with --retain_freed_memory (the default), `retain_freed_memory()`.

  Both read `argv` themselves: the flag parser runs too late. Threads that
  malloc before mallopt(M_ARENA_MAX) get glibc arenas of their own, and
  LD_PRELOAD is read only when a process starts.
  """
  use_eigen_kernels()  # First: the re-exec passes the environment on.
  retain = retain_requested(argv)
  if allocator.requested(argv) == allocator.MIMALLOC:
    allocator.exec_under_mimalloc(keep_freed_pages=retain)
  if retain:
    retain_freed_memory()


def retain_requested(argv: list) -> bool:
  """Whether `argv` leaves --retain_freed_memory on (its default), read as absl will read it."""
  return early_flags.bool_flag(argv, "retain_freed_memory", default=True)


def freed_memory_retained() -> bool:
  """Whether `retain_freed_memory()` succeeded in this process."""
  return _retained


def retain_freed_memory() -> bool:
  """Keeps memory freed by an unloaded version in the process for the next one.

  glibc gives every large block (a version's variables, ScaNN's searcher) its
  own mmap and returns it to the kernel when freed, so each new version
  touches fresh pages. On a VM that hands freed pages back to the host
  (virtio-balloon free page reporting), that first touch stalls the vCPU
  whatever the thread's priority, and requests to the serving version stall
  with it.
  With one malloc arena, no mmap'd blocks and no trimming below 2 GiB, freed
  blocks stay in the heap and the next version reuses them; the process then
  holds its peak (two versions during a swap) rather than shrinking between
  swaps. Call before any thread starts (see `prepare_server_process`).

  Under mimalloc (fgr-serve's default allocator) there is nothing to set
  here: `allocator.exec_under_mimalloc` turned its purging off, and it has
  neither glibc's single contended arena nor a malloc_trim that protobuf's
  Python runtime (upb) calls every 10,000 message-arena frees. Under glibc
  that trim, in whichever request thread triggers it with the GIL held, finds
  the unloaded version's memory free after a swap and hands it back page by
  page, holding malloc's only arena, and every request stalls meanwhile.

  Returns False (and changes nothing) where neither applies: mallopt is
  unavailable, or mimalloc purges freed pages.
  """
  global _retained
  if allocator.mimalloc_active():
    _retained = allocator.freed_pages_kept()
    logging.info("mimalloc keeps freed pages for the next version: %s", _retained)
    return _retained
  libc = _libc()
  if libc is None:
    logging.info("mallopt unavailable: freed memory goes back to the system")
    return False
  libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  ok = all(
    libc.mallopt(param, value) == 1
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_ABOVE))
  )
  _retained = ok
  logging.info("Freed memory stays in the process for the next version: %s", ok)
  return ok
