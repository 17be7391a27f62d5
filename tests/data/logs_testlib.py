"""Tiny datasets in the generic log format (docs/data_format.md) for tests that read or train on them."""

import json
import os

from models.data import logs


def write_jsonl(path, records) -> None:
  """Writes one JSON object a line to `path` (a str or a pathlib.Path)."""
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))


def write_tiny_logs(data_dir: str, num_items: int = 8, num_events: int = 64) -> None:
  """A catalog of `num_items` ads and `num_events` time-ordered clicks by 4 users, in `data_dir`."""
  os.makedirs(data_dir, exist_ok=True)
  write_jsonl(
    os.path.join(data_dir, logs.ITEMS_FILE),
    [{"ad_id": f"a{i}", "category": f"c{i % 3}", "brand": f"b{i % 2}", "tokens": [f"t{i}"]} for i in range(num_items)],
  )
  write_jsonl(
    os.path.join(data_dir, logs.EVENTS_FILE),
    [
      {"user_id": f"u{t % 4}", "timestamp": t, "query_tokens": [f"t{t % num_items}"], "ad_id": f"a{t % num_items}"}
      for t in range(num_events)
    ],
  )
