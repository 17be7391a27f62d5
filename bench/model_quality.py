"""Model quality bench: our towers against a plain id two-tower and ablations, trained by one harness.

Every model is trained and evaluated in this one process with the same data, seed and training
loop, so the comparisons (attention vs mean pooling, separate vs summed side info, logQ on/off, the
id-only baseline, cold start, leave-last-out) are side by side. Results go to a JSON file and a
Markdown table on stdout.

  python -m bench.model_quality --data_dir=../shared/datasets/ml-100k --output_dir=/tmp/model_quality
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any

from absl import app, flags, logging

from models import config as config_lib
from models import evaluation
from models import train as train_lib
from models.data import sources

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "../shared/datasets/ml-100k", "MovieLens-100K directory.")
flags.DEFINE_string("output_dir", "/tmp/model_quality", "Where each run's checkpoints and results.json go.")
flags.DEFINE_integer("epochs", 5, "Epochs of every MovieLens run.")
flags.DEFINE_integer("synthetic_epochs", 3, "Epochs of the synthetic runs.")
flags.DEFINE_list("runs", [], "Only these runs, by slug (the run name with non-alphanumerics as _; default: all).")

_SYNTHETIC = {"num_ads": 20_000, "num_users": 5_000, "num_sessions": 60_000, "seed": 0}


def _runs() -> list[tuple[str, sources.DataSpec, config_lib.TowerConfig, train_lib.TrainConfig]]:
  """(name, data, tower, training) of every run; "ours" is the default configuration."""
  movielens = sources.DataSpec(name="movielens", data_dir=FLAGS.data_dir)
  synthetic = sources.DataSpec(name="synthetic", synthetic=_SYNTHETIC)
  tower = config_lib.TowerConfig()
  training = train_lib.TrainConfig(epochs=FLAGS.epochs)
  synthetic_training = dataclasses.replace(training, epochs=FLAGS.synthetic_epochs)
  # Essential comparisons first, ablations after: results.json is rewritten after every run.
  return [
    ("ours", movielens, tower, training),
    ("ours, mean pooling", movielens, dataclasses.replace(tower, sequence_pooling="mean"), training),
    ("id-only two-tower, Adam 1e-3", movielens, dataclasses.replace(tower, features="ids_only"), training),
    (
      "id-only two-tower, Adam 1e-2",
      movielens,
      dataclasses.replace(tower, features="ids_only"),
      dataclasses.replace(training, learning_rate=1e-2),
    ),
    ("ours, 10% of movies held out", dataclasses.replace(movielens, held_out_item_fraction=0.1), tower, training),
    ("ours, leave-last-out split", dataclasses.replace(movielens, split="leave_last_out"), tower, training),
    ("synthetic: ours", synthetic, tower, synthetic_training),
    ("ours, side info summed into ids", movielens, dataclasses.replace(tower, side_info="summed"), training),
    ("ours, no logQ correction", movielens, tower, dataclasses.replace(training, logq_correction=False)),
    ("ours, DIN MLP attention", movielens, dataclasses.replace(tower, attention="din"), training),
    ("ours, 1024 mixed negatives", movielens, tower, dataclasses.replace(training, mixed_negatives=1024)),
    (
      "synthetic: ours, 10% of ads held out",
      dataclasses.replace(synthetic, held_out_item_fraction=0.1),
      tower,
      synthetic_training,
    ),
    (
      "ours, 10% of movies held out, id dropout 0.5",
      dataclasses.replace(movielens, held_out_item_fraction=0.1),
      dataclasses.replace(tower, id_dropout=0.5),
      training,
    ),
    (
      "synthetic: ours, 10% of ads held out, id dropout 0.5",
      dataclasses.replace(synthetic, held_out_item_fraction=0.1),
      dataclasses.replace(tower, id_dropout=0.5),
      synthetic_training,
    ),
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
    run_dir = os.path.join(FLAGS.output_dir, _slug(name))
    started = time.time()
    report = train_lib.train(data, tower, training, run_dir)
    model, _ = train_lib.restore(run_dir)
    evaluated = evaluation.evaluate(model.query_tower, model.item_tower, sources.open_source(data))
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


def markdown(results: dict[str, Any]) -> str:
  """The results as a Markdown table: ranking metrics, water level and cold-start ratio per run."""
  lines = [
    "| run | top-100 (TFRS) | recall@10 | ndcg@10 | recall@100 | ndcg@100 | noise ratio@100 | "
    "cold/warm recall@100 | train s |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, run in results["runs"].items():
    ranking, water = run["eval"]["ranking"], run["eval"]["water_level"]
    cold = run["eval"].get("held_out_items", {}).get("recall@100_ratio")
    lines.append(
      f"| {name} | {run['train']['test']['top_100']:.4f} | {ranking['recall@10']:.4f} | "
      f"{ranking['ndcg@10']:.4f} | {ranking['recall@100']:.4f} | {ranking['ndcg@100']:.4f} | "
      f"{water['noise_ratio']:.3f} | {'' if cold is None else f'{cold:.2f}'} | "
      f"{run['train']['train_seconds']:.0f} |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
