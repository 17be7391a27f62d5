"""Training loop: tf.data input, Keras fit with TensorBoard and checkpoints, final evaluation."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from models import channels as channels_lib
from models import config as config_lib
from models import distribute, evaluation, retrieval, sampling
from models.data import prepare, schema, sources, tfrecord

CHECKPOINT_DIR = config_lib.CHECKPOINT_DIR
_CHECKPOINT_NAME = "ckpt-{epoch:03d}"
# Checkpoints a run keeps by default: the newest five, as tf.train.CheckpointManager's max_to_keep.
DEFAULT_KEEP_CHECKPOINTS = 5
# The "run" entry of config.json that records what the data files held (`prepare.input_fingerprint`).
INPUTS = "inputs"


@dataclasses.dataclass
class TrainConfig:
  """How to train.

  Attributes:
    epochs: passes over the training examples.
    batch_size: examples per step (also the number of in-batch negatives).
    learning_rate: Adam learning rate.
    shuffle_buffer: examples in the shuffle buffer.
    cache_examples: keep the generated examples in memory after the first epoch.
    eval_max_items: skip the full-catalog evaluation above this catalog size.
    seed: TF random seed (initialisation and shuffling).
    logq_correction: subtract log Q(item) from each logit, Q being estimated from the training stream
      (see `models.sampling`).
    mixed_negatives: uniformly sampled catalog items added as negatives to every batch (0: none).
    validation_fraction: the most recent share of the training examples, held out to pick the best
      epoch and stop early on `validation_k` top-k accuracy; 0 trains every epoch without it.
    validation_k: k of the validation top-k accuracy ("val_top_<k>" in the logs and TensorBoard).
    max_validation_examples: cap on the held-out examples, to keep each validation pass short.
    early_stopping_patience: epochs without improvement before training stops.
  """

  epochs: int = 5
  batch_size: int = 1024
  learning_rate: float = 1e-3
  shuffle_buffer: int = 100_000
  cache_examples: bool = True
  eval_max_items: int = 2_000_000
  seed: int = 0
  logq_correction: bool = True
  mixed_negatives: int = 0
  validation_fraction: float = 0.0
  validation_k: int = 100
  max_validation_examples: int = 5_000
  early_stopping_patience: int = 2

  def __post_init__(self):
    # Checked before anything is read or written, each naming its fgr-train flag.
    at_least = {
      "epochs": 1,
      "batch_size": 1,
      "mixed_negatives": 0,
      "validation_k": 1,
      "early_stopping_patience": 0,
      "shuffle_buffer": 1,
      "max_validation_examples": 1,
    }
    for name, low in at_least.items():
      if getattr(self, name) < low:
        raise ValueError(f"--{name} must be {low} or more, got {getattr(self, name)}")
    if self.batch_size == 1 and self.mixed_negatives == 0:
      raise ValueError(
        "--batch_size=1 leaves each example no in-batch negative, so the loss is 0 and nothing is learned: "
        "use 2 or more, or add --mixed_negatives"
      )
    if not 0 <= self.seed < 2**32:  # What tf.keras.utils.set_random_seed takes; it said so without the flag.
      raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
    if not self.learning_rate > 0:
      raise ValueError(f"--learning_rate must be above 0, got {self.learning_rate}")
    if not math.isfinite(self.learning_rate):  # Its first step made every weight NaN.
      raise ValueError(f"--learning_rate must be finite, got {self.learning_rate}")
    if not 0.0 <= self.validation_fraction < 1.0:
      raise ValueError(f"--validation_fraction must be in [0, 1), got {self.validation_fraction}")


def example_dataset(source: sources.Source, split: str, tower: config_lib.TowerConfig | None = None) -> tf.data.Dataset:
  """Unbatched examples of a split, streamed from the source's generator, with the fields `tower`'s objective reads."""
  signature = retrieval.example_signature(tower)

  def generate():
    for batch in source.examples(split):
      missing = [name for name in signature if name not in batch]
      if missing:
        raise ValueError(f"objective {tower.objective!r} needs the example fields {missing}, which this data lacks")
      yield {name: batch[name] for name in signature}

  return tf.data.Dataset.from_generator(generate, output_signature=signature).unbatch()


def _prepared_input(
  source: tfrecord.TFRecordSource, training: TrainConfig, strategy: tf.distribute.Strategy, fields: tuple[str, ...]
) -> tuple[tf.data.Dataset, int]:
  """Training batches read from fgr-prepare's shards (sharded between workers), and steps per epoch."""
  if training.validation_fraction > 0:
    raise ValueError("--validation_fraction needs an ordered example stream; it is not available with --data=tfrecord")
  if training.mixed_negatives and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    raise ValueError("--mixed_negatives draws from a Python generator, which workers cannot shard; use 0")
  check_batches(source.num_examples("train"), training.batch_size, source.data_dir)
  steps = source.num_examples("train") // training.batch_size  # The fields were checked: check_training_fields.
  dataset = source.training_dataset(training.batch_size, training.shuffle_buffer, training.seed, fields)
  return distribute.shard_by_files(dataset, len(source.files("train")), distribute.num_workers(strategy)), steps


def check_batches(num_examples: int, batch_size: int, where: str | None = None) -> None:
  """Refuses training examples that fill no batch (the remainder is dropped), which Keras fails on as "Empty logs".

  Args:
    num_examples: how many training examples there are (or a count that stops at batch_size).
    batch_size: --batch_size.
    where: what the data is, named when there is no example at all.
  """
  if num_examples == 0:
    raise ValueError("the training split has no examples" + (f": {where}" if where else ""))
  if num_examples < batch_size:
    raise ValueError(f"{num_examples} training examples make no batch of {batch_size}: lower --batch_size")


def check_validation_k(training: TrainConfig, num_items: int) -> None:
  """Refuses a validation cut-off that holds the whole catalog, once its size is known.

  Top-k accuracy at k >= the catalog size counts every example a hit, so the validation metric is 1.0
  every epoch: early stopping then stops after `early_stopping_patience` epochs and the best epoch is
  always the first, whatever the model learnt.
  """
  if training.validation_fraction > 0 and training.validation_k >= num_items:
    raise ValueError(
      f"--validation_k must be below the catalog size ({num_items} items) for validation to tell epochs apart, "
      f"got {training.validation_k}"
    )


def _count_up_to(examples: tf.data.Dataset, limit: int) -> int:
  """How many of the first `limit` unbatched examples exist (reads no further)."""
  return int(examples.take(limit).reduce(np.int64(0), lambda count, _: count + 1).numpy())


def checkpoint_path(output_dir: str) -> str | None:
  """The newest checkpoint fgr-train wrote under output_dir, or None."""
  return tf.train.latest_checkpoint(os.path.join(output_dir, CHECKPOINT_DIR))


def _split_validation(
  examples: tf.data.Dataset, training: TrainConfig
) -> tuple[tf.data.Dataset, list[dict[str, np.ndarray]]]:
  """Holds out the last `validation_fraction` of the training examples.

  Every source yields its training examples in time order, so the held-out slice is the most recent
  one: best-epoch selection then judges the model on what comes after its training data, as the
  test split does. A random slice of the same period would reward memorising it (it did: validation
  rose while the time-ordered test fell). At most `max_validation_examples` of the slice, evenly
  spaced, are scored, to keep each validation pass short.

  Returns:
    (the examples left for training, the validation batches).
  """
  total = int(examples.reduce(np.int64(0), lambda count, _: count + 1).numpy())
  num_held_out = int(round(total * training.validation_fraction))
  if not 0 < num_held_out < total:
    raise ValueError(f"validation_fraction {training.validation_fraction} leaves no training or validation example")
  check_batches(total - num_held_out, training.batch_size)
  every = max(1, -(-num_held_out // training.max_validation_examples))
  validation = examples.skip(total - num_held_out).shard(every, 0).batch(4096)
  return examples.take(total - num_held_out), list(validation.as_numpy_iterator())


def _with_negatives(batches: tf.data.Dataset, source: sources.Source, training: TrainConfig) -> tf.data.Dataset:
  """Adds `mixed_negatives` uniformly drawn catalog items (never a held-out cold item) to each batch."""
  signature = {
    sampling.NEGATIVE_PREFIX + name: tf.TensorSpec(
      [training.mixed_negatives] + [None] * (retrieval.example_signature()[name].shape.rank - 1), tf.string
    )
    for name in schema.ITEM_FEATURE_NAMES
  }
  exclude = getattr(source, "held_out_rows", None)
  negatives = tf.data.Dataset.from_generator(
    lambda: sampling.uniform_negatives(source, training.mixed_negatives, training.seed, exclude),
    output_signature=signature,
  )
  return tf.data.Dataset.zip((batches, negatives)).map(lambda batch, extra: {**batch, **extra})


def example_fields(source: sources.Source) -> set[str] | None:
  """The fields of the source's training examples, or None when it has none (`check_batches` says so)."""
  if isinstance(source, tfrecord.TFRecordSource):
    return set(source.layout("train").columns)
  first = next(iter(source.examples("train")), None)
  return None if first is None else set(first)


def check_training_fields(source: sources.Source, towers: dict[str, config_lib.TowerConfig]) -> None:
  """Refuses data whose examples lack a field some run's objective reads, before any run trains.

  Args:
    source: the opened data.
    towers: the towers to train, by what to call them in the error ("" for a single run).
  """
  fields = example_fields(source)
  if fields is None:
    return
  for name, tower in towers.items():
    missing = [field for field in retrieval.training_fields(tower) if field not in fields]
    if missing:
      whose = f"channel {name!r} (objective {tower.objective!r})" if name else f"objective {tower.objective!r}"
      raise ValueError(
        f"{whose} needs the example fields {missing}, which {getattr(source, 'data_dir', None) or 'this data'} lacks"
      )


class _StopOnDivergence(tf.keras.callbacks.Callback):
  """Fails training at the first step whose loss is not finite.

  Raised from the step, before the epoch ends, so no checkpoint of NaN weights is written and the
  run's record still names its last good one. (Keras's TerminateOnNaN only stops at the epoch's end,
  after ModelCheckpoint has saved it, and fgr-train then printed "final_loss": NaN, which is not JSON.)
  """

  def __init__(self):
    super().__init__()
    self._epoch = 0

  def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
    self._epoch = epoch

  def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
      raise ValueError(
        f"training diverged: the loss is {float(loss)} at step {batch + 1} of epoch {self._epoch + 1}; "
        "lower --learning_rate or raise --temperature, and train into a new --output_dir"
      )


class _RunProgress(tf.keras.callbacks.Callback):
  """Records the run in config.json at each epoch's end, once that epoch's checkpoint is written.

  config.json says "state": "training" with the epochs done, their logs and the newest checkpoint,
  so a rerun of the same config continues from it (`train`), and `restore` refuses the run until
  train() marks it finished. Writing it only beside a checkpoint means a run that fails before its
  first one leaves no config.json (bad data or flags never block the corrected rerun).
  """

  def __init__(self, output_dir: str, config: tuple[Any, ...], history: list[dict[str, float]], inputs: dict[str, Any]):
    super().__init__()
    self._output_dir = output_dir
    self._config = config
    self.history = history
    self._inputs = inputs

  def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
    del self.history[epoch:]
    self.history.append({name: float(value) for name, value in (logs or {}).items()})
    newest = checkpoint_path(self._output_dir)
    run = {
      "state": config_lib.IN_PROGRESS,
      "epochs_done": epoch + 1,
      "checkpoint": None if newest is None else os.path.basename(newest),
      "history": self.history,
      INPUTS: self._inputs,
    }
    config_lib.write_run_config(self._output_dir, *self._config, run=run)


def _checkpoint_epoch(name: str) -> int:
  """The epoch of a checkpoint named by `_CHECKPOINT_NAME`."""
  return int(name.rsplit("-", 1)[1])


# The files of a complete checkpoint, as TensorFlow names them once a save has finished.
_CHECKPOINT_FILE = re.compile(r"(ckpt-\d+)\.(?:index|data-\d+-of-\d+)")


def _remove_partial_checkpoints(output_dir: str) -> None:
  """Deletes the `<checkpoint>_temp` directories of saves that never finished.

  TensorFlow writes a checkpoint's shards into `<name>_temp/` and merges them into `<name>.index`
  and `<name>.data-*` at the end; a save killed (kill -9) or failed (a full disk) leaves the
  directory, and the partial shard in it, for good. No reader looks in it: it only holds the
  space, which a full disk needs back.
  """
  for path in tf.io.gfile.glob(os.path.join(output_dir, CHECKPOINT_DIR, "ckpt-*_temp")):
    logging.info("Deleting %s, left by a checkpoint save that did not finish", path)
    tf.io.gfile.rmtree(path)


def _complete_checkpoints(output_dir: str) -> dict[int, list[str]]:
  """The files of each finished checkpoint under output_dir, by epoch.

  Only a finished checkpoint's files: a killed save's "ckpt-002_temp" failed the rerun with
  "invalid literal for int()", so the run could never be continued.
  """
  files: dict[int, list[str]] = {}
  for path in tf.io.gfile.glob(os.path.join(output_dir, CHECKPOINT_DIR, "ckpt-*")):
    complete = _CHECKPOINT_FILE.fullmatch(os.path.basename(path))
    if complete:
      files.setdefault(_checkpoint_epoch(complete.group(1)), []).append(path)
  return files


def _write_checkpoint_state(output_dir: str, epochs: list[int]) -> None:
  """Writes the checkpoint state file naming `epochs`' checkpoints, the last as the newest.

  As Keras writes it (relative paths), to a temporary file that is then renamed, so a reader never
  sees half a file.
  """
  state = os.path.join(output_dir, CHECKPOINT_DIR, "checkpoint")
  names = [_CHECKPOINT_NAME.format(epoch=epoch) for epoch in epochs]
  with tf.io.gfile.GFile(state + ".tmp", "w") as f:
    f.write(f'model_checkpoint_path: "{names[-1]}"\n')
    f.write("".join(f'all_model_checkpoint_paths: "{name}"\n' for name in names))
  tf.io.gfile.rename(state + ".tmp", state, overwrite=True)


def _rewind_checkpoints(output_dir: str, epoch: int) -> None:
  """Deletes the checkpoints after `epoch` and makes `epoch`'s the newest, as a resumed run starts there."""
  files = _complete_checkpoints(output_dir)
  for later in [e for e in files if e > epoch]:
    for path in files[later]:
      tf.io.gfile.remove(path)
  _write_checkpoint_state(output_dir, sorted(e for e in files if e <= epoch) or [epoch])


def prune_checkpoints(output_dir: str, keep: int) -> None:
  """Deletes all but the newest `keep` finished checkpoints (0: keeps every one).

  The state file is rewritten first, so it never names a deleted checkpoint. The newest is the one
  `restore` loads and a rerun continues from (with validation, the best epoch: only improving
  epochs are saved).
  """
  files = _complete_checkpoints(output_dir)
  if keep <= 0 or len(files) <= keep:
    return
  epochs = sorted(files)
  _write_checkpoint_state(output_dir, epochs[-keep:])
  for epoch in epochs[:-keep]:
    for path in files[epoch]:
      tf.io.gfile.remove(path)


class _PruneCheckpoints(tf.keras.callbacks.Callback):
  """Keeps a run's newest `keep` checkpoints as each epoch's is written.

  Keras's ModelCheckpoint keeps every epoch's: 164 MB each at the default towers, so a 50-epoch run
  needed about 8 GB. tf.train.CheckpointManager's `max_to_keep` is the same idea; Keras's callback
  has no such knob.
  """

  def __init__(self, output_dir: str, keep: int):
    super().__init__()
    self._output_dir = output_dir
    self._keep = keep

  def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
    del epoch, logs
    prune_checkpoints(self._output_dir, self._keep)


def open_data(data: sources.DataSpec) -> tuple[sources.Source, dict[str, Any]]:
  """Opens `data`, with the fingerprint (`prepare.input_fingerprint`) of the files as the source read them.

  The source counts its split as it opens (a log's events, of which the last tenth are the test
  split), so the files are fingerprinted before it opens and again after it: one changing in between
  (a log still being written) would have its split counted on the old file and the new one recorded
  in config.json, and fgr-eval would not warn that the test split it evaluates has moved. That is
  refused, naming the file, before the run writes anything.
  """
  before = prepare.readable_input_fingerprint(data)
  source = sources.open_source(data)
  inputs, changed = prepare.inputs_changed_since(data, before)
  if changed:
    paths = ", ".join(os.path.join(data.data_dir, name) for name in changed)
    raise ValueError(
      f"{paths} changed while fgr-train read it, so its split would be counted on one version and recorded "
      "as another: train on finished files (a copy of a log still being written)"
    )
  return source, inputs


def train(
  data: sources.DataSpec,
  tower: config_lib.TowerConfig,
  training: TrainConfig,
  output_dir: str,
  strategy: tf.distribute.Strategy | None = None,
  backup_every_steps: int = 0,
  opened: tuple[sources.Source, dict[str, Any]] | None = None,
  keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS,
) -> dict[str, Any]:
  """Trains the towers on `data`, writes config.json, checkpoints and TensorBoard logs to output_dir.

  config.json is written with the first checkpoint and records the run as in progress ("run":
  {"state": "training"}) until train() returns, when it records it finished, with its report.
  An output_dir holding a run of another config, a finished run or a `--channels` run is refused
  before anything is read. One holding an unfinished run of the same config (interrupted, or
  failed) is continued: under a multi-worker `strategy` from its `BackupAndRestore` backup when
  there is one (mid-epoch included), otherwise from its newest checkpoint (model and optimizer) at
  the epoch after it, so the checkpoints are numbered as in an uninterrupted run.

  With `validation_fraction`, the checkpoint left last (the one `restore` loads) is the best epoch
  on the held-out slice, and training stops early when it stops improving. Under a multi-worker
  `strategy` (`distribute.make_strategy`), every worker runs this with the same arguments; the
  chief writes the outputs and evaluates, and a backup every `backup_every_steps` steps (0: each
  epoch) lets a relaunched job resume.

  Args:
    data: what to train on.
    tower: the towers' shape.
    training: how to train.
    output_dir: where the run goes.
    strategy: a `distribute.make_strategy` strategy; None trains in this process.
    backup_every_steps: with a multi-worker strategy, back up every this many steps (0: each epoch).
    opened: `data` as `open_data` opened it, with its files' fingerprint (fgr-train --channels opens it
      once for every channel, so every channel records the files its split was counted on); None opens it.
    keep_checkpoints: the newest checkpoints kept (0: every epoch's); see `_PruneCheckpoints`.

  Returns:
    A report with the training time, the final loss and test top-k accuracy (when evaluated).
  """
  strategy = strategy or tf.distribute.get_strategy()
  multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
  chief = distribute.is_chief(strategy)
  tf.keras.utils.set_random_seed(training.seed)
  run_config = (tower, data.to_json(), dataclasses.asdict(training))
  if keep_checkpoints < 0:
    raise ValueError(f"--keep_checkpoints must be 0 (keep every epoch's) or more, got {keep_checkpoints}")
  # Refused before anything is read or written: a run of another config there must stay restorable.
  channels_lib.check_single_run_dir(output_dir)
  progress = config_lib.check_run_dir(output_dir, config_lib.run_config_json(*run_config))
  config_lib.check_writable(output_dir)
  # What the data files held when the source read them (none for synthetic data, which its config
  # makes, and for fgr-prepare's shards, whose manifest says): a rerun continues only over the same
  # data, and fgr-eval tells a report on changed data apart.
  source, inputs = opened or open_data(data)
  recorded = None if progress is None else progress.get(INPUTS)
  if recorded is not None and recorded != inputs:
    raise ValueError(
      f"{output_dir} holds an unfinished run over other data ({', '.join(prepare.changed_inputs(recorded, inputs))} "
      "changed since it began); pass another --output_dir to train on this data"
    )
  check_validation_k(training, source.num_items)
  check_training_fields(source, {"": tower})

  steps_per_epoch = None
  validation: list[dict[str, np.ndarray]] = []
  if isinstance(source, tfrecord.TFRecordSource):
    train_ds, steps_per_epoch = _prepared_input(source, training, strategy, retrieval.training_fields(tower))
    # Paths may differ between machines; what they hold, and every other flag, may not.
    run_description = {**config_lib.run_config_json(*run_config), "backup_every_steps": backup_every_steps}
    run_description["data"] = {**run_description["data"], "data_dir": None, "manifest": source.manifest}
    distribute.check_same_run(strategy, run_description)
    item_ids = source.item_id_batches
  else:
    if multi_worker:
      raise ValueError("--distribute=multi_worker reads fgr-prepare's shards: use --data=tfrecord")
    train_ds = example_dataset(source, "train", tower)
    # Before the cache, which a partial read would leave incomplete; reads at most one batch of examples.
    check_batches(
      _count_up_to(train_ds, training.batch_size), training.batch_size, getattr(source, "events_summary", None)
    )
    if training.cache_examples:
      train_ds = train_ds.cache()
    if training.validation_fraction > 0:
      train_ds, validation = _split_validation(train_ds, training)
    item_ids = train_ds.batch(8192).as_numpy_iterator

  # An unfinished run continues from its newest recorded checkpoint, unless a multi-worker backup
  # (newer, and mid-epoch) is there for `BackupAndRestore` to restore.
  resume_epoch = 0
  history: list[dict[str, float]] = []
  backup = os.path.join(output_dir, distribute.BACKUP_DIR, "chief", "checkpoint")
  if progress is not None:
    history = list(progress.get("history") or [])
    if progress.get("checkpoint") and not (multi_worker and tf.io.gfile.exists(backup)):
      resume_epoch = _checkpoint_epoch(progress["checkpoint"])
      del history[resume_epoch:]
  with strategy.scope():
    model = (
      retrieval.build_towers_for_restore(tower) if multi_worker or resume_epoch else retrieval.RetrievalModel(tower)
    )
  if training.logq_correction or training.mixed_negatives:
    # One streaming pass over the training examples (it also fills the cache for the first epoch).
    frequencies = sampling.ItemFrequencies.from_batches(item_ids()) if training.logq_correction else None
    model.set_sampling(frequencies, training.mixed_negatives, source.num_items)
  if steps_per_epoch is None:
    train_ds = train_ds.shuffle(training.shuffle_buffer, seed=training.seed, reshuffle_each_iteration=True).batch(
      training.batch_size, drop_remainder=True
    )
  if training.mixed_negatives:
    train_ds = _with_negatives(train_ds, source, training)
  train_ds = train_ds.prefetch(tf.data.AUTOTUNE)

  with strategy.scope():
    model.compile(optimizer=retrieval.make_optimizer(training.learning_rate, tower.precision))
    if resume_epoch:
      # The optimizer's slots exist before the restore, so it fills them (Adam's moments, its step).
      model.optimizer.build(model.trainable_variables)
      path = os.path.join(output_dir, CHECKPOINT_DIR, _CHECKPOINT_NAME.format(epoch=resume_epoch))
      model.load_weights(path).assert_existing_objects_matched()
  if chief:
    _remove_partial_checkpoints(output_dir)
  if resume_epoch and chief:
    _rewind_checkpoints(output_dir, resume_epoch)
  if resume_epoch:
    logging.info("Continuing the unfinished run in %s after its epoch %d", output_dir, resume_epoch)
  checkpoints = os.path.join(output_dir, CHECKPOINT_DIR, _CHECKPOINT_NAME)
  callbacks: list[tf.keras.callbacks.Callback] = []
  monitor = f"val_top_{training.validation_k}"
  # The best validation score so far, which a continued run must beat to replace its checkpoint.
  best = max((epoch[monitor] for epoch in history if monitor in epoch), default=None) if validation else None
  if validation:
    # Runs first, so the validation metric is in the epoch's logs for the callbacks after it.
    callbacks += [
      evaluation.TopKValidation(source, validation, training.validation_k),
      tf.keras.callbacks.EarlyStopping(
        monitor=monitor, mode="max", patience=training.early_stopping_patience, baseline=best
      ),
      tf.keras.callbacks.ModelCheckpoint(
        checkpoints,
        monitor=monitor,
        mode="max",
        save_best_only=True,
        save_weights_only=True,
        initial_value_threshold=best,
      ),
    ]
  else:
    callbacks.append(tf.keras.callbacks.ModelCheckpoint(checkpoints, save_weights_only=True))
  progress_log = _RunProgress(output_dir, run_config, history, inputs)
  if chief:
    callbacks.append(progress_log)  # After ModelCheckpoint: config.json is written beside a checkpoint.
    callbacks.append(_PruneCheckpoints(output_dir, keep_checkpoints))  # After config.json names the newest.
  callbacks.append(tf.keras.callbacks.TensorBoard(log_dir=os.path.join(output_dir, "logs")))
  callbacks.insert(0, _StopOnDivergence())  # First: before any callback records the step.
  resume = None
  if multi_worker:
    backup_callbacks, resume = distribute.fault_tolerance(output_dir, backup_every_steps)
    callbacks = backup_callbacks + callbacks
  started = time.time()
  # A live progress bar on a terminal; one line per epoch when the output goes to a log file.
  verbose = 1 if sys.stdout.isatty() else 2
  if resume_epoch < training.epochs:
    try:
      fit = model.fit(
        train_ds,
        epochs=training.epochs,
        initial_epoch=resume_epoch,
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        verbose=verbose,
      )
    except BaseException as e:
      if chief:  # A save that failed (a full disk) gives its space back; the finished checkpoints stay.
        _remove_partial_checkpoints(output_dir)
      if multi_worker and isinstance(e, tf.errors.UnavailableError):
        raise distribute.worker_lost(e, output_dir) from None
      raise
    if not chief:
      history = [{"loss": float(loss)} for loss in fit.history["loss"]]
  report: dict[str, Any] = {
    "train_seconds": round(time.time() - started, 1),
    "final_loss": history[-1]["loss"],
    "epochs_run": len(history),
    "num_items": source.num_items,
  }
  if resume_epoch:
    report["resumed_after_epoch"] = resume_epoch
  if resume is not None:
    report.update(workers=distribute.num_workers(strategy), resumed_from_step=resume.initial_step)
  if not chief:
    return report  # The chief evaluates; the others have no checkpoint of their own to evaluate.
  if validation:
    scores = [epoch[monitor] for epoch in history]
    report["validation"] = [round(float(v), 4) for v in scores]
    report["best_epoch"] = int(np.argmax(scores)) + 1
    model.load_weights(checkpoint_path(output_dir)).expect_partial()  # Evaluate what restore() loads.
  if source.num_items <= training.eval_max_items:
    try:
      report["test"] = evaluation.top_k_accuracy(model.query_tower, model.item_tower, source, source.examples("test"))
      logging.info("Test top-k accuracy over all %d items: %s", source.num_items, report["test"])
    except evaluation.NoTestExamples:
      report["test"] = None  # Not 0.0: nothing was missed, nothing was judged.
      logging.warning("No test accuracy: %s", evaluation.no_test_examples(source))
  else:
    logging.info("Catalog of %d items is above --eval_max_items; skipping evaluation.", source.num_items)
  # Last, and atomically: until now config.json says the run is in progress.
  config_lib.write_run_config(
    output_dir, *run_config, run={"state": config_lib.FINISHED, "report": report, INPUTS: inputs}
  )
  return report


def changed_inputs(run_config: dict[str, Any]) -> list[str]:
  """The data files that changed since the run of `run_config` (as `read_run_config` returns it) trained:
  its evaluation then is not on the data it held out. Empty for runs from before config.json recorded it."""
  recorded = run_config.get(config_lib.RUN, {}).get(INPUTS)
  if recorded is None:
    return []
  return prepare.changed_inputs(recorded, prepare.input_fingerprint(sources.DataSpec.from_json(run_config["data"])))


def restore(
  output_dir: str, precision: str | None = None, jit_compile: bool = False
) -> tuple[retrieval.RetrievalModel, dict[str, Any]]:
  """Rebuilds the model from output_dir's config.json and loads its newest checkpoint.

  A run that config.json records as unfinished (interrupted or failed) is refused: its newest
  checkpoint is not what training was asked for. Runs from before config.json recorded that are
  finished ones.

  Args:
    output_dir: the --output_dir of fgr-train.
    precision: compute dtype policy of the rebuilt towers ("float32", "mixed_bfloat16",
      "mixed_float16"); None keeps the training precision from config.json. Variables are float32
      under every policy, so any checkpoint loads into any precision.
    jit_compile: compile the towers' numeric part with XLA (see `towers.Tower`).
  """
  run_config = config_lib.read_run_config(output_dir)
  if not config_lib.run_is_finished(run_config):
    done = run_config[config_lib.RUN].get("epochs_done", 0)
    raise ValueError(
      f"{output_dir} holds an unfinished training run (interrupted after epoch {done} of "
      f"{run_config['training'].get('epochs')}); rerun fgr-train with that run's flags to continue it"
    )
  if precision is not None:
    run_config["tower"] = dataclasses.replace(run_config["tower"], precision=precision)
  path = checkpoint_path(output_dir)
  if path is None:
    raise FileNotFoundError(f"No checkpoint under {os.path.join(output_dir, CHECKPOINT_DIR)}")
  model = retrieval.build_towers_for_restore(run_config["tower"])
  try:
    status = model.load_weights(path)
  except (tf.errors.OpError, RuntimeError, IndexError) as e:  # TF's reader says only what failed to read.
    reason = tfrecord.tf_error_reason(e)
    raise ValueError(f"checkpoint {path} cannot be read ({reason}): the file is damaged or incomplete") from e
  status.assert_existing_objects_matched()  # Every tower variable must come from the checkpoint.
  status.expect_partial()  # The optimizer's slots are not needed to serve.
  model.query_tower.jit_compile = model.item_tower.jit_compile = jit_compile
  return model, run_config
