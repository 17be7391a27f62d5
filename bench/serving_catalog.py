"""Benchmark: fgr-serve latency, throughput and resident memory as the catalog grows (100k, 1M, 5M ads).

  python -m bench.serving_catalog --run_dir=runs/ads --num_ads=100000,1000000

The towers of one training run (`--run_dir`) are exported over synthetic catalogs of each size: the
run's config is copied with the catalog size changed (hashed ad ids let the item tower embed ads it never
saw in training), and `fgr-export --index=scann` builds the full graph exactly as users do, with ScaNN's
size-based defaults (no tree below 100k, a tree of about sqrt(N) leaves above). Each version is then
served alone and measured: time to AVAILABLE, resident memory (now, and its peak as sampled every
0.1 s), open-loop latency and closed-loop throughput.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

from absl import flags

from bench import serving_common as common
from bench.fixtures import servers
from cli import launch
from clients.loadtest import driver
from export import version_report

FLAGS = flags.FLAGS
common.define_flags(
  warmup_seconds=2.0, seconds=15.0, rounds=None, num_queries=300, base_path=False
)  # --run_dir: the towers to export over each catalog.
flags.adopt_module_key_flags(common)
flags.DEFINE_list("num_ads", ["100000", "1000000"], "Catalog sizes.")
flags.DEFINE_string("work_dir", "/tmp/fgr_serving_catalog", "Derived run configs and exported models (reused).")
flags.DEFINE_float("qps", 50.0, "Open-loop rate for latency.")
flags.DEFINE_integer("streams", 8, "Closed-loop streams for throughput.")
flags.DEFINE_integer(
  "fixed_knobs_from",
  2_000_000,
  "From this many ads up, fgr-export gets fixed search knobs (leaves_to_search = 1% of the "
  "leaves, reorder 400) instead of tuning them, and checks recall on --large_eval_queries queries. "
  "Both of its exact references score 256 queries against every ad at once (float32 scores plus "
  "an int64 argpartition of the same shape): about 20 GB at 5M ads.",
)
flags.DEFINE_integer("large_eval_queries", 25, "Held-out queries for the recall check from --fixed_knobs_from up.")
flags.DEFINE_bool(
  "export_only", False, "Only derive and export the catalogs (to build them ahead of a quiet measuring window)."
)

MODEL = "retrieval"


def derived_run(run_dir: str, num_ads: int, work_dir: str) -> str:
  """A copy of the run's config with `num_ads` ads, sharing its checkpoints (symlinked)."""
  out = os.path.join(work_dir, f"run_{num_ads}")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  if config["data"]["name"] != "synthetic":
    raise ValueError(f"{run_dir} was not trained on synthetic data; catalog sizes need the synthetic generator")
  config["data"]["synthetic"]["num_ads"] = num_ads
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  link = os.path.join(out, "checkpoints")
  if not os.path.exists(link):
    os.symlink(os.path.abspath(os.path.join(run_dir, "checkpoints")), link)
  return out


def export_args(num_ads: int) -> list[str]:
  """fgr-export's index and recall-check flags for a catalog of num_ads (see --fixed_knobs_from)."""
  if num_ads < FLAGS.fixed_knobs_from:
    return ["--eval_queries=100"]
  leaves = max(2, int(round(math.sqrt(num_ads))))  # ScaNN's default tree size, as fgr-export picks it.
  return [
    f"--eval_queries={FLAGS.large_eval_queries}",
    f"--index_options=leaves_to_search={max(1, leaves // 100)},reorder=400",
  ]


def export(run: str, base_path: str, num_ads: int) -> version_report.VersionReport:
  """fgr-export --index=scann of the derived run, unless a version is already there; returns its report."""
  if not (os.path.isdir(base_path) and any(v.isdigit() for v in os.listdir(base_path))):
    shutil.rmtree(base_path, ignore_errors=True)
    started = time.time()
    subprocess.run(
      [
        os.path.join(os.path.dirname(sys.executable), "fgr-export"),
        f"--checkpoint_dir={run}",
        f"--model_base_path={base_path}",
        "--index=scann",
        "--k=100",
        *export_args(num_ads),
      ],
      check=True,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    print(f"  exported in {time.time() - started:.0f} s", flush=True)
  return version_report.read(common.latest_version(base_path))


def _dir_mib(path: str) -> float:
  return round(sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20, 1)


def main(argv: list[str]) -> None:
  del argv
  rows = []
  workdir = common.workdir(FLAGS.output_dir, "serving_catalog")
  for num_ads in (int(n) for n in FLAGS.num_ads):
    print(f"{num_ads:,} ads", flush=True)
    run = derived_run(FLAGS.run_dir, num_ads, FLAGS.work_dir)
    base_path = os.path.join(FLAGS.work_dir, f"model_{num_ads}")
    exported = export(run, base_path, num_ads)
    if FLAGS.export_only:
      continue
    requests = common.query_requests(run, FLAGS.num_queries, MODEL)
    started = time.time()
    with servers.fgr_serve(workdir, MODEL, base_path, name=f"fgr-serve-{num_ads}") as model:
      load_seconds = time.time() - started
      loaded = model.memory_mib()
      (latency,) = common.compare(
        [common.Variant("open loop", lambda: driver.GrpcPredictTarget(model.address), requests, servers=(model,))],
        common.open_loop(FLAGS.qps),
      )
      (throughput,) = common.compare(
        [common.Variant("closed loop", lambda: driver.GrpcPredictTarget(model.address), requests, servers=(model,))],
        common.closed_loop(FLAGS.streams),
      )
      after = model.memory_mib()
    rows.append(
      {
        "num_ads": num_ads,
        "index_config": {k: exported.index_config[k] for k in ("scoring", "num_leaves", "leaves_to_search", "reorder")},
        "recall_at_100_vs_exact": exported.recall,
        "index_mib": round(exported.index_bytes / 2**20, 1),
        "saved_model_mib": _dir_mib(common.latest_version(base_path)),
        "seconds_to_available": round(load_seconds, 1),
        "rss_after_load_mib": loaded["rss_mib"],
        "rss_after_load_peak_mib": loaded["peak_rss_mib"],
        "rss_after_load_test_mib": after["rss_mib"],
        "peak_rss_mib": after["peak_rss_mib"],
        f"open_{FLAGS.qps:g}qps": latency,
        f"closed_{FLAGS.streams}_streams": throughput,
      }
    )
    print(json.dumps(rows[-1]), flush=True)
  if rows:
    common.finish(
      FLAGS.output_dir,
      "serving_catalog",
      {"rows": rows},
      [],
      [{"num_ads": r["num_ads"], "rss_after_load_mib": r["rss_after_load_mib"]} for r in rows],
    )


if __name__ == "__main__":
  launch.run_module(main)
