"""Model quality bench: the towers against classical baselines, with and without the sequence encoder.

Every model is trained and evaluated in this one process with the same data, seed and training
loop, so the comparisons are side by side: MovieLens split by time (the split production uses),
MovieLens converted to the generic log format (no query), the TFRS protocol, synthetic search ads
and cold start; then each part of the sequence encoder taken out. Every data split's popularity
and item co-occurrence baselines are evaluated on the same test examples (`fgr-eval` reports them
too). Results go to a JSON file and a Markdown table on stdout.

  python -m bench.model_quality --data_dir=../shared/datasets/ml-100k --output_dir=/tmp/model_quality
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
from typing import Any

from absl import flags, logging

from bench import movielens_logs
from bench.fixtures import towers
from cli import launch
from models import config as config_lib
from models import evaluation
from models import train as train_lib
from models.data import sources

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "../shared/datasets/ml-100k", "MovieLens-100K directory.")
flags.DEFINE_string("output_dir", "/tmp/model_quality", "Where each run's checkpoints and results.json go.")
flags.DEFINE_integer("epochs", 5, "Epochs of every MovieLens run.")
flags.DEFINE_integer("synthetic_epochs", 3, "Epochs of the synthetic runs.")
flags.DEFINE_bool(
  "exclude_history", False, "Judge every run and baseline without the items of each query's own history."
)
flags.DEFINE_list("runs", [], "Only these runs, by slug (the run name with non-alphanumerics as _; default: all).")

_SYNTHETIC = {"num_ads": 20_000, "num_users": 5_000, "num_sessions": 60_000, "seed": 0}


def _runs() -> list[tuple[str, sources.DataSpec, config_lib.TowerConfig, train_lib.TrainConfig]]:
  """(name, data, tower, training) of every run; "defaults" are fgr-train's defaults."""
  movielens = sources.DataSpec(name="movielens", data_dir=FLAGS.data_dir)
  by_time = dataclasses.replace(movielens, split="time")
  logs = sources.DataSpec(name="logs", data_dir=os.path.join(FLAGS.output_dir, "movielens_logs"))
  synthetic = sources.DataSpec(name="synthetic", synthetic=_SYNTHETIC)
  cold_synthetic = dataclasses.replace(synthetic, held_out_item_fraction=0.1)
  tower, sequence = config_lib.TowerConfig(), towers.SEQUENCE_TOWER
  no_user_id = dataclasses.replace(sequence, use_user_id=False)
  training = train_lib.TrainConfig(epochs=FLAGS.epochs)
  synthetic_training = dataclasses.replace(training, epochs=FLAGS.synthetic_epochs)
  # Essential comparisons first, ablations after: results.json is rewritten after every run.
  return [
    ("by time: sequence encoder", by_time, sequence, training),
    ("by time: defaults", by_time, tower, training),
    ("logs (MovieLens by time, no query): sequence encoder", logs, sequence, training),
    ("logs (MovieLens by time, no query): defaults", logs, tower, training),
    ("sequence encoder", movielens, sequence, training),
    ("defaults", movielens, tower, training),
    ("synthetic: sequence encoder", synthetic, sequence, synthetic_training),
    ("synthetic: defaults", synthetic, tower, synthetic_training),
    ("synthetic: sequence encoder, 10% of ads held out", cold_synthetic, sequence, synthetic_training),
    ("synthetic: defaults, 10% of ads held out", cold_synthetic, tower, synthetic_training),
    ("by time: sequence encoder, no user id", by_time, no_user_id, training),
    ("sequence encoder, no user id", movielens, no_user_id, training),
    ("synthetic: sequence encoder, no user id", synthetic, no_user_id, synthetic_training),
    ("synthetic: sequence encoder, no user id, 10% of ads held out", cold_synthetic, no_user_id, synthetic_training),
    (
      "by time: sequence encoder, attention target = query only",
      by_time,
      dataclasses.replace(sequence, attention_target="query"),
      training,
    ),
    ("by time: sequence encoder, no logQ", by_time, sequence, dataclasses.replace(training, logq_correction=False)),
    (
      "by time: sequence encoder, latest 10% of training for best-epoch selection",
      by_time,
      sequence,
      dataclasses.replace(training, validation_fraction=0.1, epochs=2 * FLAGS.epochs),
    ),
    ("id-only two-tower, Adam 1e-3", movielens, dataclasses.replace(tower, features="ids_only"), training),
    ("ours, 10% of movies held out", dataclasses.replace(movielens, held_out_item_fraction=0.1), tower, training),
    ("ours, leave-last-out split", dataclasses.replace(movielens, split="leave_last_out"), tower, training),
  ]


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main(argv: list[str]) -> None:
  del argv
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  results: dict[str, Any] = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
    "command": " ".join(["python -m bench.model_quality"] + sys.argv[1:]),
    "runs": {},
  }
  path = os.path.join(FLAGS.output_dir, "results.json")
  for name, data, tower, training in _runs():
    if FLAGS.runs and _slug(name) not in FLAGS.runs:
      continue
    if data.name == "logs" and not os.path.exists(os.path.join(data.data_dir, "events.jsonl")):
      movielens_logs.write_logs(FLAGS.data_dir, data.data_dir)
    run_dir = os.path.join(FLAGS.output_dir, _slug(name))
    shutil.rmtree(run_dir, ignore_errors=True)  # fgr-train refuses a finished run's directory; the bench retrains.
    started = time.time()
    report = train_lib.train(data, tower, training, run_dir)
    model, _ = train_lib.restore(run_dir)
    evaluated = evaluation.evaluate(
      model.query_tower, model.item_tower, sources.open_source(data), exclude_history=FLAGS.exclude_history
    )
    results["runs"][name] = {
      "data": data.to_json(),
      "tower": dataclasses.asdict(tower),
      "training": dataclasses.asdict(training),
      "train": report,
      "eval": evaluated,
      "wall_seconds": round(time.time() - started, 1),
    }
    logging.info("%s: %s", name, json.dumps(results["runs"][name]["eval"]))
    with open(path, "w") as f:  # After every run, so a long bench can be inspected while it runs.
      json.dump(results, f, indent=2)
  print(markdown(results))


def _data_label(data: dict[str, Any]) -> str:
  """A short name of a data split, e.g. "movielens, time" or "synthetic, 10% held out"."""
  label = data["name"] + ("" if data["split"] == "default" else f", {data['split']}")
  return label + (f", {data['held_out_item_fraction']:.0%} held out" if data["held_out_item_fraction"] else "")


def markdown(results: dict[str, Any]) -> str:
  """The results as a Markdown table: ranking, water level and cold-start ratio per run.

  The baselines (popularity, item co-occurrence) of each data split get their rows before the
  first run on that split: a model's figures are read against them.
  """
  lines = [
    "| run | recall@10 | ndcg@10 | recall@100 | ndcg@100 | conversion coverage@100 | noise ratio@100 | "
    "cold/warm recall@100 | train s |",
    "|---|---|---|---|---|---|---|---|---|",
  ]

  def row(name: str, evaluated: dict[str, Any], seconds: str) -> str:
    ranking, water = evaluated["ranking"], evaluated["water_level"]
    cold = evaluated.get("held_out_items", {}).get("recall@100_ratio")
    conversions = water.get("conversion_coverage")
    return (
      f"| {name} | {ranking['recall@10']:.4f} | {ranking['ndcg@10']:.4f} | {ranking['recall@100']:.4f} | "
      f"{ranking['ndcg@100']:.4f} | {'' if conversions is None else f'{conversions:.3f}'} | "
      f"{water['noise_ratio']:.3f} | {'' if cold is None else f'{cold:.2f}'} | {seconds} |"
    )

  baselines_shown = set()
  for name, run in results["runs"].items():
    data = json.dumps(run["data"], sort_keys=True)
    if data not in baselines_shown:
      baselines_shown.add(data)
      for baseline, evaluated in run["eval"].get("baselines", {}).items():
        lines.append(row(f"baseline: {baseline} ({_data_label(run['data'])})", evaluated, ""))
    lines.append(row(name, run["eval"], f"{run['train']['train_seconds']:.0f}"))
  return "\n".join(lines)


if __name__ == "__main__":
  launch.run_module(main)
