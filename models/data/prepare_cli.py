"""fgr-prepare: writes any training data source as sharded GZIP TFRecord files for fgr-train --data=tfrecord."""

from __future__ import annotations

import json

from absl import app, flags

from models.data import prepare, sources, synthetic

FLAGS = flags.FLAGS
_SYNTH = synthetic.SyntheticConfig()

flags.DEFINE_enum(
  "data", "synthetic", [name for name in sources.SOURCES if name != "tfrecord"], "The source to prepare."
)
flags.DEFINE_string("data_dir", "", "Directory of the MovieLens files, or of items.jsonl and events.jsonl.")
flags.DEFINE_string("output_dir", None, "Where the shards and manifest.json go (any tf.io.gfile path); resumable.")
flags.DEFINE_integer("records_per_shard", 100_000, "Examples (or catalog items) per shard.")
flags.DEFINE_integer("num_ads", _SYNTH.num_ads, "Synthetic catalog size (1k to 10M).")
flags.DEFINE_integer("num_users", _SYNTH.num_users, "Synthetic users.")
flags.DEFINE_integer("num_sessions", _SYNTH.num_sessions, "Synthetic query sessions.")
flags.DEFINE_integer("data_seed", _SYNTH.seed, "Seed of the synthetic logs.")
flags.DEFINE_enum("split", "default", list(sources.SPLITS), "Train/test split, as fgr-train's --split.")
flags.DEFINE_float("held_out_item_fraction", 0.0, "Share of items removed from training (cold start), as fgr-train's.")
flags.DEFINE_integer("held_out_item_seed", 0, "Seed choosing the held-out items.")
flags.DEFINE_bool("progress", True, "Show a progress bar per split.")
flags.mark_flag_as_required("output_dir")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  spec = sources.DataSpec.from_flags(FLAGS)
  manifest = prepare.prepare(spec, FLAGS.output_dir, FLAGS.records_per_shard, FLAGS.progress)
  summary = {split: manifest["splits"][split]["count"] for split in manifest["splits"]}
  print(json.dumps({"output_dir": FLAGS.output_dir, "examples": summary, "items": manifest["catalog"]["count"]}))


if __name__ == "__main__":  # As its console script: a user's mistake is one line, not a traceback.
  from cli import launch

  launch.run_module(main)
