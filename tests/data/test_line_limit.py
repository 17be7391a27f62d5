"""A JSON Lines line longer than logs.MAX_LINE_BYTES is refused, naming the file and line, without reading it whole."""

import json
import tracemalloc

import pytest

from export import refresh_delta
from models.data import logs
from tests.data.logs_testlib import write_jsonl


def _event_of(size: int, timestamp: int = 5) -> bytes:
  """An events.jsonl line of exactly `size` bytes (before its line feed), padded by a field the reader ignores."""
  head = {"timestamp": timestamp, "ad_id": "a1", "note": ""}
  pad = size - len(json.dumps(head).encode())
  return json.dumps({**head, "note": "x" * pad}).encode()


def _logs(tmp_path, extra_line: bytes) -> None:
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "a1"}])
  write_jsonl(tmp_path / "events.jsonl", [{"timestamp": t, "ad_id": "a1"} for t in range(3)])
  with open(tmp_path / "events.jsonl", "ab") as f:
    f.write(extra_line + b"\n")


def test_a_line_of_exactly_the_limit_is_read(tmp_path):
  _logs(tmp_path, _event_of(logs.MAX_LINE_BYTES))
  assert "4 events" in logs.LogsDataset(str(tmp_path)).events_summary


def test_a_longer_events_line_is_refused_with_its_file_and_line(tmp_path):
  _logs(tmp_path, _event_of(logs.MAX_LINE_BYTES + 1))
  message = rf"^{tmp_path}/events.jsonl:4: line longer than 1,048,576 bytes, the most a line may hold"
  with pytest.raises(ValueError, match=message):
    logs.LogsDataset(str(tmp_path))


def test_a_longer_delta_line_is_refused_with_its_file_and_line(tmp_path):
  path = tmp_path / "delta.jsonl"
  path.write_bytes(
    b'{"ad_id": "a1", "status": "paused"}\n{"ad_id": "a2", "brand": "' + b"b" * logs.MAX_LINE_BYTES + b'"}\n'
  )
  with pytest.raises(ValueError, match=rf"^{path}:2: line longer than 1,048,576 bytes"):
    refresh_delta.read_delta(str(path))


def test_a_huge_line_is_refused_without_being_read_whole(tmp_path):
  # 32 MiB on one line, no line feed: the old reader held it all as one str (and then parsed it).
  path = tmp_path / "events.jsonl"
  with open(path, "wb") as f:
    f.write(b'{"timestamp": 1, "ad_id": "a1", "note": "')
    for _ in range(32):
      f.write(b"x" * (1 << 20))
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match=":1: line longer than"):
      list(logs.text_lines(str(path)))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 4 * logs.MAX_LINE_BYTES
