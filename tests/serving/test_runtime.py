"""fgr-serve's process set-up: retained memory and the preloaded no-op malloc_trim."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from serving.util import runtime

# What fgr-serve's entry points run first, then 30,000 protobuf messages parsed and freed: upb
# calls malloc_trim(0) after every 10,000 message-arena frees.
_ENTRY_POINT = textwrap.dedent("""
    import json, os, sys
    from serving.util import runtime
    runtime.prepare_server_process(sys.argv[1:])
    from google.protobuf import wrappers_pb2
    payload = wrappers_pb2.StringValue(value="x").SerializeToString()
    for _ in range(30_000):
      wrappers_pb2.StringValue.FromString(payload)
    print(json.dumps({"pid": os.getpid(), "skipped": runtime.malloc_trim_calls_skipped(),
                      "retained": runtime.freed_memory_retained(),
                      "ld_preload": os.environ.get("LD_PRELOAD"),
                      "marker": os.environ.get("FGR_SERVE_NO_TRIM_EXEC")}))
""")


def _run_entry_point(*argv: str) -> tuple[dict, int]:
  """Runs `_ENTRY_POINT` as a process; returns its report and the pid it was started with."""
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  process = subprocess.Popen([sys.executable, "-c", _ENTRY_POINT, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err
  return json.loads(out.strip().splitlines()[-1]), process.pid


@pytest.mark.parametrize("argv, retained", [
    (["--port=0"], True),  # On by default: see runtime.retain_freed_memory.
    (["--retain_freed_memory"], True),
    (["--retain_freed_memory=true"], True),
    (["--retain_freed_memory", "--noretain_freed_memory"], False),  # The last one wins.
    (["--noretain_freed_memory", "--retain_freed_memory=1"], True),
    (["--retain_freed_memory=false"], False),
])
def test_retained_memory_follows_the_flag_read_before_tensorflow(argv, retained):
  assert runtime.retain_requested(argv) == retained


@pytest.mark.skipif(runtime.no_trim_library() is None,
                    reason="serving/util/notrim.c was not built (no C compiler at install)")
def test_retained_memory_reexecutes_with_protobufs_malloc_trim_skipped():
  report, started_pid = _run_entry_point("--port=0")
  assert report["pid"] == started_pid  # exec keeps the pid a supervisor knows.
  assert report["retained"]
  assert report["skipped"] >= 3  # Every trim protobuf asked for was answered by the no-op.
  assert report["ld_preload"] is None and report["marker"] is None  # Not passed to children.


def test_without_retained_memory_malloc_trim_stays_glibcs():
  report, _ = _run_entry_point("--noretain_freed_memory")
  assert report["skipped"] is None and not report["retained"]
  assert report["ld_preload"] is None


def test_no_reexec_without_the_library_or_after_a_failed_one(monkeypatch):
  monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("re-executed"))
  monkeypatch.setattr(runtime, "no_trim_library", lambda: None)
  runtime.exec_with_malloc_trim_skipped()  # Not built: logs a warning and goes on.

  monkeypatch.setattr(runtime, "no_trim_library", lambda: "/nonexistent/_notrim.so")
  monkeypatch.setenv("FGR_SERVE_NO_TRIM_EXEC", "1")
  runtime.exec_with_malloc_trim_skipped()  # The preload did not take: no exec loop.
