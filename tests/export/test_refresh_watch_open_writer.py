"""fgr-refresh --watch leaves a delta file that a writer still holds open, however long it has not changed."""

import sys

import pytest

from export import refresh_watch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read leases are Linux's")


def test_a_file_open_for_writing_waits_until_its_writer_closes_it(tmp_path):
  directory = str(tmp_path)
  settle = refresh_watch.Settle(seconds=0, sleep=lambda seconds: None)
  with open(tmp_path / "0001.jsonl", "w") as writer:
    writer.write('{"ad_id": "a1", "status": "paused"}\n')
    writer.flush()  # The writer pauses with the file open: its size and mtime stay as they are.
    with open(tmp_path / "0000.jsonl", "w") as done:
      done.write('{"ad_id": "a2", "status": "paused"}\n')
    assert refresh_watch.open_for_writing(str(tmp_path / "0001.jsonl"))
    assert not refresh_watch.open_for_writing(str(tmp_path / "0000.jsonl"))
    assert set(settle.settled(directory, ["0000.jsonl", "0001.jsonl"])) == {"0000.jsonl"}
    writer.write('{"ad_id": "a3", "status": "paused"}\n')
  assert set(settle.settled(directory, ["0000.jsonl", "0001.jsonl"])) == {"0000.jsonl", "0001.jsonl"}


def test_a_file_open_for_reading_only_is_taken(tmp_path):
  path = tmp_path / "0001.jsonl"
  path.write_text('{"ad_id": "a1", "status": "paused"}\n')
  with open(path):
    assert not refresh_watch.open_for_writing(str(path))
  assert not refresh_watch.open_for_writing(str(tmp_path / "missing.jsonl"))
