"""Held-out top-100 of one fgr-train process against two local workers: same shards, epochs and global batch.

Two workers with all-gathered in-batch negatives should train as one process with the global batch
does; this measures how close they come. Runs are subprocesses (the workers need their own), one
pair per seed, and the report gives each pair's relative difference.

  python -m bench.multi_worker_quality --num_sessions=40000 --epochs=3 --batch_size=512 --seeds=0,1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from absl import flags

from bench.fixtures import workers
from cli import launch
from models.data import prepare, sources

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_ads", 5_000, "Synthetic catalog size.")
flags.DEFINE_integer("num_sessions", 40_000, "Synthetic sessions.")
flags.DEFINE_integer("epochs", 3, "Training epochs of every run.")
flags.DEFINE_integer("batch_size", 512, "Global batch of every run (each of two workers takes half).")
flags.DEFINE_list("seeds", ["0"], "One one-process and one two-worker run per seed.")
flags.DEFINE_list("train_flags", ["--embedding_dim=32", "--output_dim=32", "--hidden_units=64"], "Tower flags.")
flags.DEFINE_string("work_dir", "", "Where data and runs go (default: a temporary directory).")


def _one_process(flags_: list[str], log_dir: str) -> dict[str, Any]:
  env = {**os.environ, "PYTHONPATH": workers.REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
  env.pop("TF_CONFIG", None)
  with open(os.path.join(log_dir, "one.log"), "w") as log:
    subprocess.run([sys.executable, "-m", "models.train_cli", *flags_], env=env, stdout=log, stderr=log, check=True)
  return workers.reports(os.path.join(log_dir, "one.log"))[-1]


def _two_workers(flags_: list[str], log_dir: str) -> dict[str, Any]:
  processes = workers.launch(workers.free_ports(2), flags_, log_dir)
  if any(process.wait() for process in processes):
    raise RuntimeError(f"a worker failed; see {log_dir}")
  return workers.reports(os.path.join(log_dir, "worker0.log"))[-1]


def main(argv: list[str]) -> None:
  del argv
  work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="multi_worker_quality_")
  data_dir = os.path.join(work_dir, "data")
  spec = sources.DataSpec(
    name="synthetic",
    synthetic={
      "num_ads": FLAGS.num_ads,
      "num_users": max(1000, FLAGS.num_sessions // 20),
      "num_sessions": FLAGS.num_sessions,
    },
  )
  prepare.prepare(spec, data_dir, records_per_shard=10_000, progress=False)
  for seed in FLAGS.seeds:
    runs = {}
    for name, run in (("one_process", _one_process), ("two_workers", _two_workers)):
      run_dir = os.path.join(work_dir, f"{name}-{seed}")
      os.makedirs(run_dir, exist_ok=True)
      common = [f"--data_dir={data_dir}", f"--epochs={FLAGS.epochs}", f"--batch_size={FLAGS.batch_size}"]
      flags_ = ["--data=tfrecord", *common, f"--seed={seed}", f"--output_dir={run_dir}", *FLAGS.train_flags]
      report = run(flags_, run_dir)
      runs[name] = {"top_100": round(report["test"]["top_100"], 4), "train_seconds": report["train_seconds"]}
    one, two = runs["one_process"]["top_100"], runs["two_workers"]["top_100"]
    print(json.dumps({"seed": int(seed), **runs, "relative_difference": round((two - one) / one, 4)}))


if __name__ == "__main__":
  launch.run_module(main)
