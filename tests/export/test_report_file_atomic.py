"""--report_file is written through a uniquely named temporary file, fsync'd, then renamed over the report."""

import contextlib
import io
import os
import stat

import pytest

from export import report_file


def _publish(text: str, path: str) -> None:
  with contextlib.redirect_stdout(io.StringIO()):
    report_file.publish(text, path)


def test_a_run_writing_the_same_report_keeps_its_temporary_file(tmp_path):
  """Another run is mid-write at `<report>.tmp`: the old fixed name truncated it, then renamed it away."""
  path = str(tmp_path / "report.json")
  other = path + ".tmp"
  with open(other, "w") as f:
    f.write('{"other run": ')
  _publish('{"run": 1}', path)
  with open(path) as f:
    assert f.read() == '{"run": 1}\n'
  with open(other) as f:
    assert f.read() == '{"other run": '
  assert sorted(os.listdir(tmp_path)) == ["report.json", "report.json.tmp"]


def test_the_report_is_fsynced_before_it_replaces_the_old_one(tmp_path, monkeypatch):
  path = str(tmp_path / "report.json")
  events = []
  fsync, replace = os.fsync, os.replace

  def record_fsync(fd):
    events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
    fsync(fd)

  def record_replace(source, target):
    with open(source) as f:
      events.append(("replace", f.read(), target))
    replace(source, target)

  monkeypatch.setattr(os, "fsync", record_fsync)
  monkeypatch.setattr(os, "replace", record_replace)
  _publish('{"run": 2}', path)
  kinds = [event[0] for event in events]
  assert kinds == ["fsync", "replace", "fsync"]  # The file, the rename, then its directory.
  assert events[1][1:] == ('{"run": 2}\n', path)
  assert events[2][1] == str(tmp_path)


def test_a_failed_write_keeps_the_old_report_and_leaves_no_temporary_file(tmp_path, monkeypatch):
  path = str(tmp_path / "report.json")
  _publish('{"run": 3}', path)

  def full_disk(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", full_disk)
  with pytest.raises(OSError, match="No space left"):
    _publish('{"run": 4}', path)
  with open(path) as f:
    assert f.read() == '{"run": 3}\n'
  assert os.listdir(tmp_path) == ["report.json"]


def test_the_report_gets_the_mode_a_plain_write_would_give_it(tmp_path):
  umask = os.umask(0o022)
  try:
    report_file.write_atomically(str(tmp_path / "report.json"), "{}")
  finally:
    os.umask(umask)
  assert stat.S_IMODE(os.stat(tmp_path / "report.json").st_mode) == 0o644
