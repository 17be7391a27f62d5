"""fgr-train: trains the query and item towers and writes checkpoints, TensorBoard logs and config.json."""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf
from absl import app, flags, logging

from cli import flag_use
from models import channels as channels_lib
from models import config as config_lib
from models import distribute
from models import train as train_lib
from models.data import logs, sources, synthetic

FLAGS = flags.FLAGS
_TOWER, _TRAIN, _SYNTH = config_lib.TowerConfig(), train_lib.TrainConfig(), synthetic.SyntheticConfig()

flags.DEFINE_enum(
  "data",
  "synthetic",
  list(sources.SOURCES),
  "Training data: the built-in synthetic search-ads logs, MovieLens-100K, your own logs in the generic "
  "format (docs/data_format.md), or fgr-prepare's TFRecord shards of any of them.",
)
flags.DEFINE_string(
  "data_dir", "", "Directory of the MovieLens files, of items.jsonl and events.jsonl, or of fgr-prepare's output."
)
flags.DEFINE_string("output_dir", None, "Where config.json, checkpoints/ and logs/ (TensorBoard) go.")
flags.DEFINE_integer("num_ads", _SYNTH.num_ads, "Synthetic catalog size (1k to 10M).")
flags.DEFINE_integer("num_users", _SYNTH.num_users, "Synthetic users.")
flags.DEFINE_integer("num_sessions", _SYNTH.num_sessions, "Synthetic query sessions.")
flags.DEFINE_integer("data_seed", _SYNTH.seed, "Seed of the synthetic logs.")
flags.DEFINE_integer("embedding_dim", _TOWER.embedding_dim, "Width of id and token embeddings.")
flags.DEFINE_integer("output_dim", _TOWER.output_dim, "Width of the query/item embeddings the index searches.")
flags.DEFINE_list("hidden_units", [str(u) for u in _TOWER.hidden_units], "MLP widths of both towers.")
flags.DEFINE_integer("id_buckets", _TOWER.id_buckets, "Hash buckets of the ad id embedding.")
flags.DEFINE_enum(
  "sequence_pooling",
  _TOWER.sequence_pooling,
  ["attention", "mean"],
  "Target attention over the behaviour sequence, or a plain mean.",
)
flags.DEFINE_enum(
  "attention", _TOWER.attention, ["dot", "din"], "Target attention: scaled dot-product, or DIN's MLP attention unit."
)
flags.DEFINE_enum(
  "side_info",
  _TOWER.side_info,
  ["separate", "summed"],
  "Encode the behaviour sequence's side info (category, brand) apart from the ids and add "
  "the two (residual), or attend over id + category + brand summed.",
)
flags.DEFINE_enum(
  "features",
  _TOWER.features,
  ["full", "text", "ids_only"],
  "Full towers; the query's text <-> the ad's text, category and brand; or user id <-> item id "
  "embeddings only (the TFRS basic tutorial's baseline).",
)
flags.DEFINE_enum(
  "objective",
  _TOWER.objective,
  ["clicks", "relevance", "value"],
  "What a positive is worth: every click alike; clicks plus a same-category relevance loss; or "
  "clicks weighted by conversion and bid (the examples must carry them).",
)
flags.DEFINE_float("relevance_weight", _TOWER.relevance_weight, "Weight of the relevance loss (objective=relevance).")
flags.DEFINE_float(
  "conversion_weight", _TOWER.conversion_weight, "Extra weight of a converted click (objective=value)."
)
flags.DEFINE_float("bid_exponent", _TOWER.bid_exponent, "A click weighs bid ** bid_exponent (objective=value).")
flags.DEFINE_list(
  "channels",
  [],
  "Train one run per recall channel (semantic, efficiency) under OUTPUT_DIR/<channel>/, each with "
  "its preset features and objective; fgr-export serves them in one graph. Empty: one run.",
)
flags.DEFINE_enum(
  "precision",
  _TOWER.precision,
  list(config_lib.PRECISIONS),
  "Compute dtype of the towers; variables and output embeddings stay float32.",
)
flags.DEFINE_float(
  "id_dropout",
  _TOWER.id_dropout,
  "Share of training positives whose id embedding the "
  "item tower zeroes, so that ads unseen in training are placed well from side info.",
)
flags.DEFINE_enum(
  "sequence_encoder",
  _TOWER.sequence_encoder,
  ["self_attention", "none"],
  "Re-encode the behaviour sequence with self-attention blocks (SASRec) and add its most recent position to the query.",
)
flags.DEFINE_integer("sequence_layers", _TOWER.sequence_layers, "Self-attention blocks of the sequence encoder.")
flags.DEFINE_integer("sequence_heads", _TOWER.sequence_heads, "Attention heads of each block.")
flags.DEFINE_float("sequence_dropout", _TOWER.sequence_dropout, "Dropout of the sequence encoder in training.")
flags.DEFINE_integer("max_history", _TOWER.max_history, "Most recent behaviours the sequence encoder reads.")
flags.DEFINE_enum(
  "attention_target",
  _TOWER.attention_target,
  ["query_and_latest", "query"],
  "What target attention looks for: the query and the encoded latest behaviour, or the query alone.",
)
flags.DEFINE_bool(
  "use_user_id", _TOWER.use_user_id, "Embed the user id (off: the query tower generalises to unseen users)."
)
flags.DEFINE_float("temperature", _TOWER.temperature, "Softmax temperature of the retrieval loss.")
flags.DEFINE_bool(
  "logq_correction",
  _TRAIN.logq_correction,
  "Correct in-batch logits by log Q(item), Q estimated from the training stream.",
)
flags.DEFINE_integer(
  "mixed_negatives", _TRAIN.mixed_negatives, "Uniformly sampled catalog items added as negatives to every batch."
)
flags.DEFINE_float(
  "validation_fraction",
  _TRAIN.validation_fraction,
  "Share of training examples held out for early stopping and best-epoch selection (0: off).",
)
flags.DEFINE_integer("validation_k", _TRAIN.validation_k, "k of the validation top-k accuracy; below the catalog size.")
flags.DEFINE_integer(
  "early_stopping_patience",
  _TRAIN.early_stopping_patience,
  "Epochs without validation improvement before training stops.",
)
flags.DEFINE_enum(
  "split",
  "default",
  list(sources.SPLITS),
  "default: MovieLens' TFRS 80/20 split, or the log's time tail; time: the last 10% of events in "
  "time, for every source; leave_last_out: each user's last interaction is the test example.",
)
flags.DEFINE_float(
  "held_out_item_fraction", 0.0, "Share of items removed from training entirely, to measure cold start (0: none)."
)
flags.DEFINE_integer("held_out_item_seed", 0, "Seed choosing the held-out items.")
flags.DEFINE_integer("epochs", _TRAIN.epochs, "Training epochs.")
flags.DEFINE_integer("batch_size", _TRAIN.batch_size, "Batch size (in-batch negatives per example).")
flags.DEFINE_float("learning_rate", _TRAIN.learning_rate, "Adam learning rate.")
flags.DEFINE_integer("seed", _TRAIN.seed, "Seed of initialisation and shuffling.")
flags.DEFINE_enum(
  "distribute",
  "none",
  list(distribute.STRATEGIES),
  "none: this process; multi_worker: MultiWorkerMirroredStrategy over the cluster in TF_CONFIG (needs --data=tfrecord).",
)
flags.DEFINE_integer(
  "backup_every_steps", 0, "With multi_worker: back up for fault tolerance every this many steps (0: each epoch)."
)
flags.DEFINE_integer(
  "keep_checkpoints",
  train_lib.DEFAULT_KEEP_CHECKPOINTS,
  "Checkpoints kept in OUTPUT_DIR/checkpoints: the newest (with --validation_fraction, the best epochs); "
  "0 keeps every epoch's.",
)
flags.DEFINE_float(
  "cluster_timeout_seconds",
  600.0,
  "With multi_worker: how long a worker waits for every task in TF_CONFIG to start before it exits with an error.",
)
flags.mark_flag_as_required("output_dir")


# The sequence encoder's own flags; and the flags a --channels preset sets for each channel. Given
# where nothing reads them, each would be ignored without a word, so `check_flags_apply` refuses it.
_ENCODER_FLAGS = ("sequence_layers", "sequence_heads", "sequence_dropout", "max_history")
_PRESET_FLAGS = ("features", "objective")


def check_flags_apply(towers: dict[str, config_lib.TowerConfig], channels_run: bool) -> None:
  """Refuses a flag the command line sets that no tower trained here reads (usage error naming it).

  `towers`: the tower of each run (one, or one per channel).
  """
  if channels_run and flag_use.given(_PRESET_FLAGS):
    presets = "; ".join(f"{name}: {channels_lib.PRESETS[name]}" for name in towers)
    raise app.UsageError(
      f"{flag_use.given(_PRESET_FLAGS)}: each channel's preset sets it ({presets}); drop it with --channels"
    )
  full = [tower for tower in towers.values() if tower.features == "full"]
  if not full and FLAGS.sequence_encoder != "none":
    kinds = sorted({tower.features for tower in towers.values()})
    raise app.UsageError(
      f"--sequence_encoder: only full towers read the behaviour sequence, and these are {', '.join(kinds)}"
    )
  if not any(tower.sequence_encoder != "none" for tower in full) and flag_use.given(_ENCODER_FLAGS):
    raise app.UsageError(f"{flag_use.given(_ENCODER_FLAGS)}: only with --sequence_encoder=self_attention, which is off")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Every flag is checked (building the configs) before the strategy, which may wait for the cluster.
  data = sources.DataSpec.from_flags(FLAGS)
  tower = config_lib.TowerConfig(
    embedding_dim=FLAGS.embedding_dim,
    output_dim=FLAGS.output_dim,
    hidden_units=config_lib.parse_hidden_units(FLAGS.hidden_units),
    id_buckets=FLAGS.id_buckets,
    sequence_pooling=FLAGS.sequence_pooling,
    temperature=FLAGS.temperature,
    attention=FLAGS.attention,
    side_info=FLAGS.side_info,
    features=FLAGS.features,
    precision=FLAGS.precision,
    id_dropout=FLAGS.id_dropout,
    sequence_encoder=FLAGS.sequence_encoder,
    sequence_layers=FLAGS.sequence_layers,
    sequence_heads=FLAGS.sequence_heads,
    sequence_dropout=FLAGS.sequence_dropout,
    max_history=FLAGS.max_history,
    attention_target=FLAGS.attention_target,
    use_user_id=FLAGS.use_user_id,
    objective=FLAGS.objective,
    relevance_weight=FLAGS.relevance_weight,
    conversion_weight=FLAGS.conversion_weight,
    bid_exponent=FLAGS.bid_exponent,
  )
  training = train_lib.TrainConfig(
    epochs=FLAGS.epochs,
    batch_size=FLAGS.batch_size,
    learning_rate=FLAGS.learning_rate,
    seed=FLAGS.seed,
    logq_correction=FLAGS.logq_correction,
    mixed_negatives=FLAGS.mixed_negatives,
    validation_fraction=FLAGS.validation_fraction,
    validation_k=FLAGS.validation_k,
    early_stopping_patience=FLAGS.early_stopping_patience,
  )
  names = channels_lib.parse_channels(FLAGS.channels) if FLAGS.channels else None
  check_flags_apply(
    {name: channels_lib.channel_tower(name, tower) for name in names} if names else {"": tower}, bool(names)
  )
  # Before any other op: collectives start with it.
  strategy = distribute.make_strategy(FLAGS.distribute, FLAGS.cluster_timeout_seconds)
  created = _topmost_missing(FLAGS.output_dir)  # What the run's first write will create.
  try:
    if names:
      report = _train_channels(names, data, tower, training, strategy)
    else:
      report = train_lib.train(
        data,
        tower,
        training,
        FLAGS.output_dir,
        strategy,
        FLAGS.backup_every_steps,
        keep_checkpoints=FLAGS.keep_checkpoints,
      )
  except BaseException:
    # Only the chief: other workers of a multi-worker run may be writing into the same directory.
    if created is not None and distribute.is_chief(strategy):
      _remove_if_no_files(created)
    raise
  print(json.dumps(report))


def _topmost_missing(path: str) -> str | None:
  """The outermost directory of `path` (itself included) that does not exist yet; None if path exists.

  Local paths only climb: on a remote file system (gs://...) only `path` itself is considered.
  """
  path = path.rstrip("/") or "/"
  try:
    if tf.io.gfile.exists(path):
      return None
    missing = path
    if not logs.is_remote(path):
      parent = os.path.dirname(missing)
      while parent and parent != missing and not tf.io.gfile.exists(parent):
        missing, parent = parent, os.path.dirname(parent)
    return missing
  except tf.errors.OpError:  # Unreachable: the run's own check of --output_dir says so in one line.
    return None


def _remove_if_no_files(created: str) -> None:
  """Removes the directories a refused run created when they hold no file: a run refused after
  --output_dir was made (say, too few examples for a batch) left it behind, empty, for the next run."""
  try:
    if not any(files for _, _, files in tf.io.gfile.walk(created)):
      tf.io.gfile.rmtree(created)
  except tf.errors.OpError as e:  # The run's own error is the one to report.
    logging.warning("Could not remove the empty directory %s this run made: %s", created, e.message)


def _train_channels(
  names: list[str],
  data: sources.DataSpec,
  base: config_lib.TowerConfig,
  training: train_lib.TrainConfig,
  strategy: tf.distribute.Strategy,
) -> dict:
  """Trains one run per channel under OUTPUT_DIR/<channel>/, then writes channels.json.

  Every channel's directory and data fields are checked before any channel trains, so a channel
  that cannot train never leaves another half done. A rerun of the same flags keeps the channels
  already trained and continues the one that was interrupted.
  """
  towers = {name: channels_lib.channel_tower(name, base) for name in names}
  channels_lib.check_channels_dir(FLAGS.output_dir, names)
  config_lib.check_writable(FLAGS.output_dir)
  finished: dict[str, dict] = {}  # Their reports.
  for name, tower in towers.items():
    channel_dir = channels_lib.channel_dir(FLAGS.output_dir, name)
    run_config = config_lib.run_config_json(tower, data.to_json(), dataclasses.asdict(training))
    try:
      config_lib.check_run_dir(channel_dir, run_config)  # Refuses a channel of another config.
    except config_lib.AlreadyTrained:
      finished[name] = config_lib.read_run_config(channel_dir).get(config_lib.RUN, {}).get("report", {})
  if len(finished) == len(names) and channels_lib.read_channels(FLAGS.output_dir) == names:
    raise ValueError(
      f"{FLAGS.output_dir} holds a --channels run of these flags that is already trained; pass another --output_dir"
    )
  # Opened (and fingerprinted) once: every channel trains on the split counted here and records these files.
  opened = train_lib.open_data(data)
  train_lib.check_training_fields(opened[0], {name: towers[name] for name in names if name not in finished})
  report = {}
  for number, name in enumerate(names, 1):
    if name in finished:
      logging.info("Channel %s is already trained in %s", name, FLAGS.output_dir)
      report[name] = finished[name]
      continue
    # Keras's epoch lines and the test accuracy name no channel: say whose follow.
    logging.info("Training channel %s (%d of %d)", name, number, len(names))
    report[name] = train_lib.train(
      data,
      towers[name],
      training,
      channels_lib.channel_dir(FLAGS.output_dir, name),
      strategy,
      FLAGS.backup_every_steps,
      opened,
      FLAGS.keep_checkpoints,
    )
  if distribute.is_chief(strategy):
    channels_lib.write_channels(FLAGS.output_dir, names, report)
  return report


if __name__ == "__main__":  # As its console script: a user's mistake is one line, not a traceback.
  from cli import launch

  launch.run_module(main)
