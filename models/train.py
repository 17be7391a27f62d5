"""Training loop: tf.data input, Keras fit with TensorBoard and checkpoints, final evaluation."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import tensorflow as tf
from absl import logging

from models import config as config_lib
from models import evaluation, retrieval
from models.data import sources

CHECKPOINT_DIR = "checkpoints"


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
  """

  epochs: int = 5
  batch_size: int = 1024
  learning_rate: float = 1e-3
  shuffle_buffer: int = 100_000
  cache_examples: bool = True
  eval_max_items: int = 2_000_000
  seed: int = 0


def example_dataset(source: sources.Source, split: str) -> tf.data.Dataset:
  """Unbatched examples of a split, streamed from the source's generator."""
  signature = retrieval.example_signature()

  def generate():
    for batch in source.examples(split):
      yield {name: batch[name] for name in signature}

  return tf.data.Dataset.from_generator(generate, output_signature=signature).unbatch()


def checkpoint_path(output_dir: str) -> str | None:
  """The newest checkpoint fgr-train wrote under output_dir, or None."""
  return tf.train.latest_checkpoint(os.path.join(output_dir, CHECKPOINT_DIR))


def train(data: sources.DataSpec, tower: config_lib.TowerConfig, training: TrainConfig,
          output_dir: str) -> dict[str, Any]:
  """Trains the towers on `data`, writes config.json, checkpoints and TensorBoard logs to output_dir.

  Returns:
    A report with the training time, the final loss and test top-k accuracy (when evaluated).
  """
  tf.keras.utils.set_random_seed(training.seed)
  source = sources.open_source(data)
  config_lib.write_run_config(output_dir, tower, data.to_json(), dataclasses.asdict(training))

  train_ds = example_dataset(source, "train")
  if training.cache_examples:
    train_ds = train_ds.cache()
  train_ds = (train_ds.shuffle(training.shuffle_buffer, seed=training.seed, reshuffle_each_iteration=True)
              .batch(training.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

  model = retrieval.RetrievalModel(tower)
  model.compile(optimizer=tf.keras.optimizers.Adam(training.learning_rate))
  callbacks = [
      tf.keras.callbacks.TensorBoard(log_dir=os.path.join(output_dir, "logs")),
      tf.keras.callbacks.ModelCheckpoint(
          os.path.join(output_dir, CHECKPOINT_DIR, "ckpt-{epoch:03d}"), save_weights_only=True),
  ]
  started = time.time()
  # A live progress bar on a terminal; one line per epoch when the output goes to a log file.
  verbose = 1 if sys.stdout.isatty() else 2
  history = model.fit(train_ds, epochs=training.epochs, callbacks=callbacks, verbose=verbose)
  report: dict[str, Any] = {
      "train_seconds": round(time.time() - started, 1),
      "final_loss": float(history.history["loss"][-1]),
      "num_items": source.num_items,
  }
  if source.num_items <= training.eval_max_items:
    report["test"] = evaluation.top_k_accuracy(model.query_tower, model.item_tower, source,
                                               source.examples("test"))
    logging.info("Test top-k accuracy over all %d items: %s", source.num_items, report["test"])
  else:
    logging.info("Catalog of %d items is above --eval_max_items; skipping evaluation.", source.num_items)
  return report


def restore(output_dir: str) -> tuple[retrieval.RetrievalModel, dict[str, Any]]:
  """Rebuilds the model from output_dir's config.json and loads its newest checkpoint."""
  run_config = config_lib.read_run_config(output_dir)
  path = checkpoint_path(output_dir)
  if path is None:
    raise FileNotFoundError(f"No checkpoint under {os.path.join(output_dir, CHECKPOINT_DIR)}")
  model = retrieval.build_towers_for_restore(run_config["tower"])
  status = model.load_weights(path)
  status.assert_existing_objects_matched()  # Every tower variable must come from the checkpoint.
  status.expect_partial()  # The optimizer's slots are not needed to serve.
  return model, run_config
