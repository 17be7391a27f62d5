"""Crash safety: fgr-refresh killed with SIGKILL in the middle of a publish leaves no loadable partial version."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import tensorflow as tf

from export import refresh, refresh_delta, version_files, versions
from serving.core import file_system_source

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _temp_dirs(base_path):
  return [name for name in os.listdir(base_path) if name.startswith(".tmp-version-")]


def _kill_mid_publish(base_path, delta_path, timeout=600.0):
  """Runs fgr-refresh and SIGKILLs it as soon as its SavedModel is half written; returns what it had written.

  `timeout` only guards against a hang: on 2 shared cores under load the whole test took 219 s, so
  the refresh itself (import, load, embed, build) may need minutes before it writes.
  """
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_ROOT)
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "export.refresh_cli",
      f"--model_base_path={base_path}",
      f"--delta={delta_path}",
      "--keep_versions=0",
    ],
    cwd=REPO_ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  deadline = time.time() + timeout
  written = None
  while written is None:
    for name in _temp_dirs(base_path):
      variables = os.path.join(base_path, name, "model", "variables")
      if os.path.isdir(variables):  # tf.saved_model.save has started writing the new version.
        written = sorted(os.listdir(os.path.join(base_path, name, "model")))
    if written is None and (process.poll() is not None or time.time() > deadline):
      process.kill()
      raise AssertionError(f"fgr-refresh ended before it could be killed:\n{process.stderr.read().decode()}")
    time.sleep(0.002)
  process.send_signal(signal.SIGKILL)
  assert process.wait(30) == -signal.SIGKILL
  process.stderr.close()
  return written


def test_kill_9_mid_publish_leaves_only_complete_versions(scann_export, tmp_path):
  import scann  # noqa: F401  Registers ScaNN's ops for loading the versions here.

  base_path = str(tmp_path / "models")
  version_files.link_tree(scann_export, os.path.join(base_path, "1"))
  delta_path = str(tmp_path / "delta.jsonl")
  with open(delta_path, "w") as f:
    f.write(json.dumps({"ad_id": "fresh-ad", "category": "c1", "brand": "b1", "tokens": ["t1_1"]}) + "\n")

  written = _kill_mid_publish(base_path, delta_path)
  assert "variables" in written
  # The half-written version sits under a hidden name: neither our listing nor the server's sees it.
  assert versions.list_versions(base_path) == [1]
  assert sorted(file_system_source.list_versions(base_path)) == [1]
  assert len(_temp_dirs(base_path)) == 1 and not os.path.exists(os.path.join(base_path, "2"))
  tf.saved_model.load(os.path.join(base_path, "1"))

  # The next refresh deletes the debris first (its process is gone: on a nearly full disk it needs the
  # space, which pruning gave back only an hour later), then publishes a complete version 2.
  report = refresh.Refresher(base_path, keep_versions=None).apply(refresh_delta.read_delta(delta_path))
  assert not _temp_dirs(base_path)
  assert report["version"] == 2 and versions.list_versions(base_path) == [1, 2]
  assert "fresh-ad" in tf.saved_model.load(os.path.join(base_path, "2")).item_ids.numpy().astype(str)


def _owned_temp(base_path, **owner):
  """A temporary directory as a publish makes one, its owner record changed by `owner`."""
  path = versions._make_temp(base_path, ".tmp-version-9-")
  record = os.path.join(path, "owner.json")
  with open(record) as f:
    written = json.load(f)
  with open(record, "w") as f:
    json.dump({**written, **owner}, f)
  return os.path.basename(path)


def test_a_publish_deletes_temporary_directories_whose_process_is_gone_whatever_their_age(tmp_path):
  base = str(tmp_path / "models")
  os.makedirs(base)
  script = "import sys; from export import versions; print(versions._make_temp(sys.argv[1], '.tmp-version-3-'))"
  ended = subprocess.run(
    [sys.executable, "-c", script, base],
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": REPO_ROOT},
    cwd=REPO_ROOT,
    check=True,
  ).stdout.strip()
  assert os.path.isdir(ended)  # Made by a process that has ended.
  running = _owned_temp(base)  # This process.
  reused_pid = _owned_temp(base, started=-1)  # This PID, but a process that started at another time.
  elsewhere = _owned_temp(base, host="another-host")  # Cannot be checked: deleted by age only.
  elsewhere_old = _owned_temp(base, host="another-host")
  os.utime(os.path.join(base, elsewhere_old), (time.time() - 2 * 3600,) * 2)
  no_record = os.path.basename(tempfile.mkdtemp(prefix=".tmp-version-5-", dir=base))  # An earlier release's.
  with versions.publish(base) as (temp_path, version):
    os.makedirs(temp_path)
    open(os.path.join(temp_path, "saved_model.pb"), "w").close()
  assert version == 1
  assert sorted(os.listdir(base)) == sorted(["1", running, elsewhere, no_record])
  assert reused_pid not in os.listdir(base) and os.path.basename(ended) not in os.listdir(base)


def test_a_full_disk_is_one_line_naming_the_temporary_directories_that_hold_space(tmp_path):
  from cli import launch

  base = str(tmp_path / "models")
  os.makedirs(base)
  running = _owned_temp(base)
  with open(os.path.join(base, running, "variables.data"), "wb") as f:
    f.write(b"x" * 3 * 2**20)
  for full in (
    OSError(errno.ENOSPC, "No space left on device"),
    tf.errors.ResourceExhaustedError(None, None, "foo; No space left on device [Op:SaveV2]"),
  ):
    with pytest.raises(versions.DiskFullError) as error:
      with versions.publish(base) as (temp_path, _):
        os.makedirs(temp_path)
        raise full
    message = launch.user_error_message(error.value)
    assert f"No space left on device writing version 1 under {base}" in message and "nothing was published" in message
    assert f"{running} (3 MB)" in message and "\n" not in message
    assert sorted(os.listdir(base)) == [running]  # Its own temporary directory is gone.
  shutil.rmtree(os.path.join(base, running))
  with pytest.raises(versions.DiskFullError, match="no temporary directories are left there"):
    with versions.publish(base):
      raise OSError(errno.ENOSPC, "No space left on device")


def test_sigterm_during_a_publish_removes_its_temporary_directory(tmp_path):
  """fgr-refresh exits on SIGTERM through SystemExit: the publish under way cleans up (Python's default
  SIGTERM left `.tmp-version-*` behind, pruned only an hour later)."""
  script = (
    "import os, signal, sys, time\n"
    "from export import refresh_cli, versions\n"
    "refresh_cli._exit_on_stop_signals()\n"
    "with versions.publish(sys.argv[1]) as (temp_path, version):\n"
    "  os.makedirs(temp_path)\n"
    "  open(os.path.join(temp_path, 'saved_model.pb'), 'w').close()\n"
    "  os.kill(os.getpid(), signal.SIGTERM)\n"
    "  time.sleep(60)\n"
  )
  base = tmp_path / "models"
  result = subprocess.run(
    [sys.executable, "-c", script, str(base)],
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": REPO_ROOT},
    timeout=300,
    cwd=REPO_ROOT,
  )
  assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
  assert os.listdir(base) == [] and "Traceback" not in result.stderr
