"""fgr-train: trains the query and item towers and writes checkpoints, TensorBoard logs and config.json."""

from __future__ import annotations

import json

from absl import app, flags, logging

from models import config as config_lib
from models import train as train_lib
from models.data import sources, synthetic

FLAGS = flags.FLAGS
_TOWER, _TRAIN, _SYNTH = config_lib.TowerConfig(), train_lib.TrainConfig(), synthetic.SyntheticConfig()

flags.DEFINE_enum("data", "synthetic", list(sources.SOURCES), "Training data: the built-in synthetic "
                  "search-ads logs, MovieLens-100K, or your own logs in the generic format (docs/data_format.md).")
flags.DEFINE_string("data_dir", "", "Directory of the MovieLens files, or of items.jsonl and events.jsonl.")
flags.DEFINE_string("output_dir", None, "Where config.json, checkpoints/ and logs/ (TensorBoard) go.")
flags.DEFINE_integer("num_ads", _SYNTH.num_ads, "Synthetic catalog size (1k to 10M).")
flags.DEFINE_integer("num_users", _SYNTH.num_users, "Synthetic users.")
flags.DEFINE_integer("num_sessions", _SYNTH.num_sessions, "Synthetic query sessions.")
flags.DEFINE_integer("data_seed", _SYNTH.seed, "Seed of the synthetic logs.")
flags.DEFINE_integer("embedding_dim", _TOWER.embedding_dim, "Width of id and token embeddings.")
flags.DEFINE_integer("output_dim", _TOWER.output_dim, "Width of the query/item embeddings the index searches.")
flags.DEFINE_list("hidden_units", [str(u) for u in _TOWER.hidden_units], "MLP widths of both towers.")
flags.DEFINE_integer("id_buckets", _TOWER.id_buckets, "Hash buckets of the ad id embedding.")
flags.DEFINE_enum("sequence_pooling", _TOWER.sequence_pooling, ["attention", "mean"],
                  "Target attention over the behaviour sequence, or a plain mean.")
flags.DEFINE_float("temperature", _TOWER.temperature, "Softmax temperature of the retrieval loss.")
flags.DEFINE_integer("epochs", _TRAIN.epochs, "Training epochs.")
flags.DEFINE_integer("batch_size", _TRAIN.batch_size, "Batch size (in-batch negatives per example).")
flags.DEFINE_float("learning_rate", _TRAIN.learning_rate, "Adam learning rate.")
flags.DEFINE_integer("seed", _TRAIN.seed, "Seed of initialisation and shuffling.")
flags.mark_flag_as_required("output_dir")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  data = sources.DataSpec(name=FLAGS.data, data_dir=FLAGS.data_dir)
  if FLAGS.data == "synthetic":
    data.synthetic = {"num_ads": FLAGS.num_ads, "num_users": FLAGS.num_users,
                      "num_sessions": FLAGS.num_sessions, "seed": FLAGS.data_seed}
  tower = config_lib.TowerConfig(
      embedding_dim=FLAGS.embedding_dim, output_dim=FLAGS.output_dim,
      hidden_units=tuple(int(u) for u in FLAGS.hidden_units), id_buckets=FLAGS.id_buckets,
      sequence_pooling=FLAGS.sequence_pooling, temperature=FLAGS.temperature)
  training = train_lib.TrainConfig(epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
                                   learning_rate=FLAGS.learning_rate, seed=FLAGS.seed)
  report = train_lib.train(data, tower, training, FLAGS.output_dir)
  logging.info("Training report: %s", report)
  print(json.dumps(report))


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
