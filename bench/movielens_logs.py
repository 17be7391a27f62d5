"""Writes MovieLens-100K in the generic log format (docs/data_format.md), as a new user would convert it.

items.jsonl gets each movie's first genre (category), decade (brand), genres and title words
(tokens); events.jsonl gets every rating as an event in time order (ties in file order), with the
user's profile and no query. `fgr-train --data=logs` then splits it by time (the last 10% of events
is the test set), so it measures the towers on time-ordered data without any MovieLens-specific
input such as the latest movie playing the query.

  python -m bench.movielens_logs --data_dir=../shared/datasets/ml-100k --output_dir=/tmp/ml100k_logs
"""

from __future__ import annotations

import json
import os

from absl import flags

from cli import launch
from models.data import logs, movielens, schema, sequences

FLAGS = flags.FLAGS


def write_logs(data_dir: str, output_dir: str) -> None:
  """Converts the MovieLens-100K files under data_dir into items.jsonl and events.jsonl in output_dir."""
  source = movielens.MovieLens100K(data_dir)
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, logs.ITEMS_FILE), "w", encoding="utf-8") as f:
    for _, items in sequences.iterate_catalog(source):
      for ad_id, category, brand, tokens in zip(
        items[schema.AD_ID], items[schema.CATEGORY], items[schema.BRAND], items[schema.AD_TOKENS]
      ):
        record = {"ad_id": ad_id, "category": category, "brand": brand, "tokens": [t for t in tokens if t]}
        f.write(json.dumps(record) + "\n")
  raw, order = movielens.read_ratings(data_dir)
  profiles = source.user_profiles()
  with open(os.path.join(output_dir, logs.EVENTS_FILE), "w", encoding="utf-8") as f:
    for user, item, _, timestamp in raw[order].tolist():
      record = {"user_id": str(user), "timestamp": timestamp, "user_features": profiles[str(user)], "ad_id": str(item)}
      f.write(json.dumps(record) + "\n")


def main(argv: list[str]) -> None:
  del argv
  write_logs(FLAGS.data_dir, FLAGS.output_dir)
  print(f"Wrote {FLAGS.output_dir}/{logs.ITEMS_FILE} and {logs.EVENTS_FILE}")


if __name__ == "__main__":
  # Defined here, not at import: bench.model_quality imports write_logs and has flags of these names.
  flags.DEFINE_string("data_dir", "../shared/datasets/ml-100k", "MovieLens-100K directory.")
  flags.DEFINE_string("output_dir", "/tmp/ml100k_logs", "Where items.jsonl and events.jsonl go.")
  launch.run_module(main)
