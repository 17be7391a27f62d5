"""Training input: today's JSON path against fgr-prepare's TFRecord path, and fgr-prepare's memory.

`--mode=input` writes synthetic logs in the generic JSON format (items.jsonl, events.jsonl), runs
fgr-prepare on them, and on the same examples measures, in one run:
  - examples/s of each input pipeline iterated alone (no model): `models.train.example_dataset`
    over the logs (batched as fgr-train batches it, uncached), and `TFRecordSource.training_dataset`;
  - training steps/s with each as the input of the same model and batch.
`--mode=prepare_rss` runs fgr-prepare over synthetic logs of each `--num_sessions` in a subprocess
and samples its RSS (psutil): peak RSS against events written and output bytes.

  python -m bench.input_pipeline --mode=input --num_sessions=60000
  python -m bench.input_pipeline --mode=prepare_rss --num_sessions=100000,1000000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import tensorflow as tf
from absl import app, flags

from bench.fixtures import resources
from cli import launch
from export import report_file
from models import config as config_lib
from models import retrieval
from models import train as train_lib
from models.data import logs, prepare, schema, sequences, sources, synthetic, tfrecord

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "input", ["input", "prepare_rss"], "What to measure.")
flags.DEFINE_list("num_sessions", ["60000"], "Synthetic sessions (about 1.55 events each); prepare_rss takes several.")
flags.DEFINE_integer("num_ads", 20_000, "Synthetic catalog size.")
flags.DEFINE_integer("batch_size", 1024, "Examples per batch (and per training step).")
flags.DEFINE_integer("train_steps", 40, "Timed training steps per input (after a warm-up epoch's first steps).")
flags.DEFINE_string("work_dir", "", "Where the logs and shards go (default: a temporary directory).")
flags.DEFINE_string("report_file", "", "Also write the JSON results here.")


def write_logs(source: sources.Source, data_dir: str) -> int:
  """Writes a source's catalog and examples (train, then test: time order) as the generic JSON logs."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, logs.ITEMS_FILE), "w") as f:
    for _, items in sequences.iterate_catalog(source):
      for i, ad_id in enumerate(items[schema.AD_ID]):
        tokens = [t for t in items[schema.AD_TOKENS][i] if t]
        record = {"ad_id": ad_id, "category": items[schema.CATEGORY][i], "brand": items[schema.BRAND][i]}
        f.write(json.dumps({**record, "tokens": tokens, "status": items[schema.STATUS][i]}) + "\n")
  events = 0
  with open(os.path.join(data_dir, logs.EVENTS_FILE), "w") as f:
    for split in ("train", "test"):
      for batch in source.examples(split):
        for i in range(len(batch[schema.AD_ID])):
          record = {
            "user_id": batch[schema.USER_ID][i],
            "timestamp": events,
            "user_features": [t for t in batch[schema.USER_FEATURES][i] if t],
            "query_tokens": [t for t in batch[schema.QUERY_TOKENS][i] if t],
            "ad_id": batch[schema.AD_ID][i],
          }
          f.write(json.dumps(record) + "\n")
          events += 1
  return events


def _examples_per_second(dataset: tf.data.Dataset, batches: int, batch_size: int) -> float:
  """Over the second epoch: a whole pass over the data (the shuffle buffer refills from the start)."""
  iterator = iter(dataset)
  for _ in range(batches):  # Warm-up: threads, traced parsers, the first shards.
    next(iterator)
  started = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - started)


def _steps_per_second(dataset: tf.data.Dataset, steps: int, num_items: int) -> float:
  tf.keras.utils.set_random_seed(0)
  model = retrieval.RetrievalModel(config_lib.TowerConfig())
  model.compile(optimizer=retrieval.make_optimizer(1e-3, "float32"))
  iterator = iter(dataset)
  model.fit(iterator, steps_per_epoch=5, epochs=1, verbose=0)  # Traces the step.
  started = time.perf_counter()
  model.fit(iterator, steps_per_epoch=steps, epochs=1, verbose=0)
  return steps / (time.perf_counter() - started)


def measure_input(work_dir: str, num_sessions: int) -> dict[str, Any]:
  config = {"num_ads": FLAGS.num_ads, "num_users": max(1000, num_sessions // 20), "num_sessions": num_sessions}
  # Shards per size: fgr-prepare refuses to resume an output over logs that changed.
  logs_dir, shards_dir = os.path.join(work_dir, "logs"), os.path.join(work_dir, f"shards-{num_sessions}")
  events = write_logs(synthetic.SyntheticSearchAds(synthetic.SyntheticConfig(**config)), logs_dir)
  manifest = prepare.prepare(sources.DataSpec(name="logs", data_dir=logs_dir), shards_dir, progress=False)
  json_source = sources.open_source(sources.DataSpec(name="logs", data_dir=logs_dir))
  shards = tfrecord.TFRecordSource(shards_dir)
  batch = FLAGS.batch_size
  batches = manifest["splits"]["train"]["count"] // batch

  def json_batches() -> tf.data.Dataset:  # fgr-train's JSON input, as train.py builds it (uncached).
    dataset = train_lib.example_dataset(json_source, "train").shuffle(100_000, seed=0)
    return dataset.batch(batch, drop_remainder=True).repeat().prefetch(tf.data.AUTOTUNE)

  def tfrecord_batches() -> tf.data.Dataset:
    return shards.training_dataset(batch, 100_000, seed=0)

  json_rate = _examples_per_second(json_batches(), batches, batch)
  tfrecord_rate = _examples_per_second(tfrecord_batches(), batches, batch)
  return {
    "events": events,
    "train_examples": manifest["splits"]["train"]["count"],
    "batch_size": batch,
    "json_examples_per_s": round(json_rate),
    "tfrecord_examples_per_s": round(tfrecord_rate),
    "ratio": round(tfrecord_rate / json_rate, 1),
    "json_train_steps_per_s": round(_steps_per_second(json_batches(), FLAGS.train_steps, shards.num_items), 2),
    "tfrecord_train_steps_per_s": round(_steps_per_second(tfrecord_batches(), FLAGS.train_steps, shards.num_items), 2),
  }


def measure_prepare_rss(work_dir: str, num_sessions: int) -> dict[str, Any]:
  """fgr-prepare over synthetic logs in a subprocess, its RSS sampled every 0.2 s."""
  output_dir = os.path.join(work_dir, f"prepared-{num_sessions}")
  command = [
    sys.executable,
    "-m",
    "models.data.prepare_cli",
    "--data=synthetic",
    f"--num_ads={FLAGS.num_ads}",
    f"--num_users={max(1000, num_sessions // 20)}",
    f"--num_sessions={num_sessions}",
    f"--output_dir={output_dir}",
    "--noprogress",
  ]
  started = time.time()
  process = subprocess.Popen(command, stdout=subprocess.PIPE)
  sampler = resources.ResourceSampler(process.pid, interval=0.2)
  out, _ = process.communicate()
  sampler.stop()
  if process.returncode:
    raise RuntimeError(f"fgr-prepare failed ({process.returncode})")
  summary = json.loads(out.decode().strip().splitlines()[-1])
  size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(output_dir) for name in names)
  rss = np.asarray([sample[2] for sample in sampler.samples])
  return {
    "num_sessions": num_sessions,
    "events": sum(summary["examples"].values()),
    "output_mb": round(size / 2**20, 1),
    "peak_rss_mb": round(float(np.nanmax(rss)) / 2**20, 1),
    "seconds": round(time.time() - started, 1),
  }


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.report_file:
    try:  # Before measuring: a report that could not be written was found out after minutes, and lost.
      report_file.check(FLAGS.report_file, make_directory=True)
    except (OSError, ValueError) as e:
      raise app.UsageError(str(e)) from None
  work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="input_pipeline_")
  sizes = [int(n) for n in FLAGS.num_sessions]
  if FLAGS.mode == "input":
    results = [measure_input(work_dir, n) for n in sizes]
  else:
    results = [measure_prepare_rss(work_dir, n) for n in sizes]
  for result in results:
    print(json.dumps(result))
  if FLAGS.report_file:
    report_file.write_atomically(FLAGS.report_file, json.dumps(results, indent=1))


if __name__ == "__main__":
  launch.run_module(main)
