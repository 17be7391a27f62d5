"""Freshness, publish-time phase: from a delta file to the first answer of the version it makes.

A resident refresher (as `fgr-refresh --watch` keeps one) applies a delta changing --changed_fraction
of the catalog, plus a new ad made to match the probe query, a removed and a paused ad; the probe is
sent every 20 ms until the new version answers. The time is split into embed / build / write (the
refresher) and publish-to-first-answer (poll, load, warm-up, switch), with the CPU seconds of each
side; a status-only delta is timed the same way. With --compare_full a delta of the same size is then
published with a full ScaNN retrain, and recall@k of the three versions is measured against exact
search. With --measure_cli a one-shot `fgr-refresh --delta` process is timed too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from bench import freshness_setup as setup
from bench.fixtures import resources
from export import exporter, refresh, refresh_delta, refresh_state
from models.data import queries as queries_lib
from models.data import schema, sources

FLAGS = setup.FLAGS


def measure_load_and_warmup(version_path: str) -> dict[str, float]:
  """fgr-serve's own loader and warm-up, timed in this process."""
  from serving.servables import saved_model_bundle  # pylint: disable=g-import-not-at-top
  from serving.servables import warmup as serving_warmup  # pylint: disable=g-import-not-at-top

  started = time.perf_counter()
  bundle = saved_model_bundle.SavedModelBundle(setup.MODEL, 0, version_path)
  loaded = time.perf_counter()
  serving_warmup.run_warmup(bundle, 1)
  warmed = time.perf_counter()
  bundle.close()
  return {"load_seconds": round(loaded - started, 2), "warmup_seconds": round(warmed - loaded, 2)}


def publish_time(version_path: str, source: sources.Source, queries: dict[str, np.ndarray]) -> dict[str, Any]:
  """Delta file → first answer from the new version, with a resident refresher."""
  import scann  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  base_path = setup.served_copy(version_path, "publish")
  with setup.serve(base_path, "publish-server") as server:
    probe_request = setup.query_request(queries, 0)
    setup.wait_for_version(server, probe_request, 1, 600)
    _, probe_ids = setup.answer(server, probe_request)
    refresher = refresh.Refresher(
      base_path,
      index_overrides=exporter.parse_index_options(FLAGS.index_options),
      verify_recall=False,
      index_update=FLAGS.index_update,
    )
    started = time.perf_counter()
    refresher.prepare()
    resident_seconds = time.perf_counter() - started
    state = refresher.source().state
    new_ad, new_line, margin = setup.pick_probe_ad(
      server, probe_request, source, refresher.source().row_of, probe_ids, "fresh-probe-ad"
    )
    extra = [
      new_line,
      json.dumps({"ad_id": probe_ids[1], "deleted": True}),
      json.dumps({"ad_id": probe_ids[2], "status": "paused"}),
    ]
    lines = setup.make_delta(state, source, FLAGS.changed_fraction, 1, set(probe_ids[:3]), extra)
    delta_path = os.path.join(FLAGS.work_dir, "publish-delta.jsonl")
    report = _apply_timed(refresher, server, probe_request, delta_path, lines, 600)
    result = {
      "catalog_items": int(len(state.ids)),
      "delta_lines": len(lines),
      "delta": report["delta"],
      "refresher_start_seconds (once, resident)": round(resident_seconds, 2),
      **_split(report, server),
      "new_probe_ad_score_over_kth": round(margin, 4),
      "new_probe_ad_in_answer": new_ad in report["ids"],
      "removed_ad_in_answer": probe_ids[1] in report["ids"],
      "paused_ad_in_answer": probe_ids[2] in report["ids"],
      "index_options": report["index_options"],
    }
    status_lines = [json.dumps({"ad_id": probe_ids[3], "status": "paused"})]
    status_report = _apply_timed(refresher, server, probe_request, delta_path, status_lines, 600)
    result["status_only"] = {
      "change_to_first_answer_seconds": round(status_report["first_answer_at"] - status_report["changed_at"], 2),
      "refresher_total_seconds": round(status_report["published_at"] - status_report["changed_at"], 2),
      "publish_to_first_answer_seconds": round(status_report["first_answer_at"] - status_report["published_at"], 2),
      "server_load_and_warmup_seconds": server.load_seconds(status_report["version"]),
      "paused_ad_in_answer": probe_ids[3] in status_report["ids"],
    }
    if FLAGS.compare_full:
      refresher.index_update = "full"
      full_lines = setup.make_delta(refresher.source().state, source, FLAGS.changed_fraction, 2, set(probe_ids[:4]), [])
      full_report = _apply_timed(refresher, server, probe_request, delta_path, full_lines, 900)
      result["full_retrain"] = {"delta": full_report["delta"], **_split(full_report, server)}
      refresher.index_update = FLAGS.index_update
  result.update(measure_load_and_warmup(report["path"]))
  if FLAGS.compare_full:
    recall_queries = queries_lib.held_out_queries(source, FLAGS.recall_queries)
    result[f"recall_at_{report['k']}_vs_exact_on_{len(recall_queries[schema.USER_ID])}_held_out_queries"] = {
      "version 1 (export)": version_recall(os.path.join(base_path, "1"), recall_queries),
      f"version {report['version']} ({report['index_update']})": version_recall(report["path"], recall_queries),
      f"version {full_report['version']} (full retrain)": version_recall(full_report["path"], recall_queries),
    }
  if FLAGS.measure_cli:
    setup.write_delta(delta_path, lines)
    started = time.time()
    subprocess.run(
      [
        sys.executable,
        "-m",
        "export.refresh_cli",
        f"--model_base_path={base_path}",
        f"--delta={delta_path}",
        "--from_version=1",
        "--keep_versions=0",
        *setup.index_options_args(),
      ],
      cwd=setup.REPO,
      check=True,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    result["one_shot_cli_seconds (process start to published)"] = round(time.time() - started, 2)
  return result


def _apply_timed(
  refresher: refresh.Refresher, server: setup.Served, probe_request, delta_path: str, lines: list[str], timeout: float
) -> dict[str, Any]:
  """Writes the delta, applies it and waits for the probe's first answer from the new version.

  Returns the refresher's report plus `changed_at` (the delta file written), `first_answer_at`, the
  probe's answer `ids` there, and `cpu`: the CPU seconds of the critical path (see `_cpu_split`).
  """
  setup.write_delta(delta_path, lines)
  changed_at, cpu = time.time(), _cpu_now(server)
  report = refresher.apply(refresh_delta.read_delta(delta_path))
  cpu_published = _cpu_now(server)
  first_answer_at, ids = setup.wait_for_version(server, probe_request, report["version"], timeout)
  return {
    **report,
    "changed_at": changed_at,
    "first_answer_at": first_answer_at,
    "ids": ids,
    "cpu": _cpu_split(cpu, cpu_published, _cpu_now(server)),
  }


def _cpu_now(server: setup.Served) -> tuple[float, float]:
  """(this process's CPU seconds, the server's CPU seconds)."""
  return resources.cpu_seconds(), server.fgr_serve.cpu_seconds()


def _cpu_split(
  start: tuple[float, float], published: tuple[float, float], answered: tuple[float, float]
) -> dict[str, float]:
  """CPU seconds of the critical path: the refresher's publish, then the server up to the first answer.

  Wall time on a shared machine stretches with its load; CPU time is what the work itself costs.
  """
  refresher, server = published[0] - start[0], answered[1] - published[1] + published[1] - start[1]
  return {
    "refresher_cpu_seconds": round(refresher, 2),
    "server_cpu_seconds": round(server, 2),
    "total_cpu_seconds": round(refresher + server, 2),
  }


def _split(report: dict[str, Any], server: setup.Served) -> dict[str, Any]:
  """A rebuild's time from delta file to first answer, step by step."""
  changed_at, published_at, first_answer_at = report["changed_at"], report["published_at"], report["first_answer_at"]
  return {
    "change_to_first_answer_seconds": round(first_answer_at - changed_at, 2),
    "index_update": report["index_update"],
    "embed_seconds": report["embed_seconds"],
    "build_seconds": report["build_seconds"],
    "write_seconds": report["write_seconds"],
    "refresher_total_seconds": round(published_at - changed_at, 2),
    "publish_to_first_answer_seconds": round(first_answer_at - published_at, 2),
    "server_load_and_warmup_seconds": server.load_seconds(report["version"]),
    **report.get("cpu", {}),
  }


def version_recall(version_path: str, queries: dict[str, np.ndarray], batch_size: int = 50) -> float:
  """recall@k of a version's serving_default against exact search over its own catalog (active ads)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  loaded = tf.saved_model.load(version_path)
  state = refresh_state.read_state(version_path)
  embeddings = np.asarray(state.embeddings)
  found = []
  for start in range(0, len(queries[schema.USER_ID]), batch_size):
    tensors = {name: tf.constant(values[start : start + batch_size]) for name, values in queries.items()}
    served = loaded.signatures["serving_default"](**tensors)["ids"].numpy().astype(str)
    query_embeddings = loaded.signatures["encode_query"](**tensors)["embedding"].numpy()
    scores = query_embeddings @ embeddings.T
    scores[:, ~state.eligible] = -np.inf
    exact = np.argpartition(-scores, served.shape[1], axis=1)[:, : served.shape[1]]
    found += [len(set(row) & set(state.ids[rows])) / served.shape[1] for row, rows in zip(served, exact)]
  return round(float(np.mean(found)), 4)
