"""fgr-serve's allocator: the re-exec under mimalloc, read from argv before TensorFlow's import."""

import os
import sys

import pytest
import serving_testlib as lib

from serving.util import allocator

# What fgr-serve's entry points leave: the process after `runtime.prepare_server_process`.
_REPORT = """
    import json, os
    from serving.util import allocator, runtime
    print(json.dumps({"pid": os.getpid(), "mimalloc": allocator.mimalloc_active(),
                      "retained": runtime.freed_memory_retained(),
                      "ld_preload": os.environ.get("LD_PRELOAD"),
                      "purge_delay": os.environ.get("MIMALLOC_PURGE_DELAY"),
                      "marker": os.environ.get("FGR_SERVE_ALLOCATOR_EXEC")}))
"""
_NEEDS_MIMALLOC = pytest.mark.skipif(
  allocator.mimalloc_library() is None or not sys.platform.startswith("linux"),
  reason="mimalloc (pip package cmeel-mimalloc) is installed on Linux only",
)


def _run_entry_point(*argv: str, ld_preload: str | None = None) -> tuple[dict, int]:
  """Runs fgr-serve's set-up and `_REPORT` as a process; returns its report and the pid it was started with."""
  env = {"LD_PRELOAD": ld_preload, "MIMALLOC_PURGE_DELAY": None, "FGR_SERVE_ALLOCATOR_EXEC": None}
  return lib.run_server_setup(_REPORT, *argv, env=env)


@pytest.mark.parametrize(
  "argv, expected",
  [
    (["--port=0"], "mimalloc"),  # The default.
    (["--allocator=system"], "system"),
    (["--allocator", "system"], "system"),
    (["--allocator=system", "--allocator=mimalloc"], "mimalloc"),  # The last one wins.
    (["--allocator=tcmalloc"], "tcmalloc"),  # Left for the flag parser to refuse.
  ],
)
def test_allocator_is_read_from_argv(argv, expected):
  assert allocator.requested(argv) == expected


@_NEEDS_MIMALLOC
def test_default_reexecutes_under_mimalloc_that_keeps_freed_pages():
  report, started_pid = _run_entry_point("--port=0")
  assert report["pid"] == started_pid  # exec keeps the pid a supervisor knows.
  assert report["mimalloc"] and report["retained"] and report["purge_delay"] == "-1"
  assert report["ld_preload"] is None and report["marker"] is None  # Children get the system's malloc.


@_NEEDS_MIMALLOC
def test_mimalloc_purges_without_retained_memory():
  report, _ = _run_entry_point("--noretain_freed_memory")
  assert report["mimalloc"] and not report["retained"] and report["purge_delay"] is None


@_NEEDS_MIMALLOC
def test_reexec_keeps_the_callers_preloads():
  libm = next(
    (
      p
      for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6", "/lib64/libm.so.6")
      if os.path.exists(p)
    ),
    None,
  )
  if libm is None:
    pytest.skip("no libm.so.6 at a known path to preload")
  report, _ = _run_entry_point("--port=0", ld_preload=libm)
  assert report["mimalloc"] and report["ld_preload"] == libm


def test_system_allocator_keeps_glibc_with_retained_memory():
  report, started_pid = _run_entry_point("--allocator=system")
  assert report["pid"] == started_pid and not report["mimalloc"]
  assert report["ld_preload"] is None and report["purge_delay"] is None
  assert report["retained"] == sys.platform.startswith("linux")  # glibc's mallopt.


def test_no_reexec_without_mimalloc_or_after_a_failed_one(monkeypatch):
  monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("re-executed"))
  monkeypatch.setattr(allocator, "mimalloc_active", lambda: False)
  monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
  allocator.exec_under_mimalloc(keep_freed_pages=True)  # Not installed: a warning, and on.

  monkeypatch.setattr(allocator, "mimalloc_library", lambda: "/nonexistent/libmimalloc.so")
  monkeypatch.setenv("FGR_SERVE_ALLOCATOR_EXEC", "1")
  allocator.exec_under_mimalloc(keep_freed_pages=True)  # The preload did not take: no exec loop.
