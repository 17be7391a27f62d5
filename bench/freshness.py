"""Freshness: how fast a catalog change reaches answers, and what version swaps cost under load.

  python bench/freshness.py --work_dir=/tmp/freshness --num_ads=1000000

Trains a small model and exports it with ScaNN (both reused when already in --work_dir), serves it
with fgr-serve on 127.0.0.1, then measures:

1. Publish time (bench/freshness_publish.py). A delta changing --changed_fraction of the catalog
   (new, changed, removed and paused ads) is written; a resident refresher (as `fgr-refresh --watch`
   keeps one) publishes it; a probe query is sent every 20 ms until the new version answers.
   Reported: the time from the delta file to that first answer, split into embed / build / write (the
   refresher) and publish-to-first-answer (poll, load, warm-up, switch), with load and warm-up also
   measured on their own with fgr-serve's loader. With --compare_full, a second delta of the same
   size is then published with a full ScaNN retrain (`--index_update=full`), timed the same way, and
   recall@k of version 1, the incremental version and the retrained one is measured against exact
   search on held-out queries. A one-shot `fgr-refresh --delta` process is timed too.
2. Swaps under load (bench/freshness_swaps.py). An open-loop load of --qps single-query Predicts
   runs for --steady_seconds, then `fgr-refresh --watch` (a niced subprocess) publishes --swaps
   deltas in a row, alternating rebuilds (--changed_fraction changed) and status-only changes. Every
   answer is checked: a new ad made to match the probe query (the side info of its best ad) appears
   in the probe's answers of the version that adds it; removed and paused ads appear in no answer of
   the versions that exclude them. Reported: failed requests, p50/p99 steady, inside the swap windows
   (from the publish to 3 s after the new version's first answer, which covers the old version's
   unload) and during the refresher's builds, the hypervisor's CPU steal in the steady phase and the
   windows, and the server's RSS.

The flags and the setup both phases share are in bench/freshness_setup.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from absl import app, flags, logging  # noqa: E402

from bench import freshness_publish, freshness_setup, freshness_swaps  # noqa: E402
from cli import launch
from models import train  # noqa: E402
from models.data import queries as queries_lib  # noqa: E402
from models.data import sources  # noqa: E402

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(freshness_setup)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.makedirs(FLAGS.work_dir, exist_ok=True)
  if FLAGS.part == "phases":
    print(json.dumps(freshness_swaps.saved_run_phases(FLAGS.work_dir), indent=2))
    return
  run_dir, version_path = freshness_setup.ensure_version(FLAGS.work_dir)
  _, run_config = train.restore(run_dir)
  source = sources.open_source(sources.DataSpec.from_json(run_config["data"]))
  queries = queries_lib.held_out_queries(source, 200)
  results: dict[str, Any] = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "command": " ".join(["python bench/freshness.py"] + sys.argv[1:]),
    "version_path": version_path,
  }
  if FLAGS.part in ("all", "publish"):
    results["publish"] = freshness_publish.publish_time(version_path, source, queries)
    logging.info("Publish time: %s", results["publish"])
    print(json.dumps({"publish": results["publish"]}), flush=True)
  if FLAGS.part in ("all", "swaps"):
    results["swaps_under_load"] = freshness_swaps.swaps_under_load(version_path, source, queries)
  with open(os.path.join(FLAGS.work_dir, "freshness.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  launch.run_module(main)
