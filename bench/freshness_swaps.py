"""Freshness, swaps phase: versions published one after another while an open-loop load runs.

An open-loop load of --qps single-query Predicts runs for --steady_seconds, then `fgr-refresh --watch`
(a niced subprocess) publishes --swaps deltas in a row, alternating rebuilds (--changed_fraction
changed) and status-only changes. Every answer is checked: a new ad made to match the probe query (the
side info of its best ad) appears in the probe's answers of the version that adds it; removed and
paused ads appear in no answer of the versions that exclude them. Reported: failed requests, p50/p99
steady, inside the swap windows (from the publish to 3 s after the new version's first answer, which
covers the old version's unload) and during the refresher's builds, the hypervisor's CPU steal in
the steady phase and the windows, and the server's RSS. The timeline is saved, so that `saved_run_phases`
(--part=phases) can place a run's slow answers against fgr-serve's log again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from bench import freshness_setup as setup
from bench import swap_phases
from bench.fixtures import latency, resources
from export import refresh_state, versions
from models.data import schema, sources
from serving.util import runtime

FLAGS = setup.FLAGS
# A swap window runs from the publish to this long after the new version's first answer, which covers
# the old version's unload.
WINDOW_AFTER_FIRST_ANSWER_S = 3.0


class OpenLoopLoad:
  """Sends single-query Predicts on a fixed schedule (open loop: latency counts from the scheduled time).

  Every answer is reduced to (version, which tracked ad ids it contains).
  """

  def __init__(self, server: setup.Served, requests: list, qps: float, tracked: set[str], max_seconds: float):
    self._server, self._requests, self._qps = server, requests, qps
    self._tracked = tracked
    self._max_requests = int(qps * max_seconds)
    self.scheduled = np.zeros(self._max_requests)
    self.latency = np.full(self._max_requests, np.nan)
    self.version = np.zeros(self._max_requests, np.int64)
    self.failed: dict[int, str] = {}
    self.hits: dict[int, frozenset[str]] = {}
    self.first_answered_at: dict[int, float] = {}  # version -> when its first answer arrived
    self.sent = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._outstanding = threading.Semaphore(0)

  def start(self) -> None:
    self.started = time.time()
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()
    for _ in range(self.sent):  # Wait for every answer (or its timeout).
      self._outstanding.acquire(timeout=30)

  def _run(self) -> None:
    for i in range(self._max_requests):
      due = self.started + i / self._qps
      delay = due - time.time()
      if delay > 0 and self._stop.wait(delay):
        return
      if self._stop.is_set():
        return
      self.scheduled[i] = due
      future = self._server.stub.Predict.future(self._requests[i % len(self._requests)], timeout=10)
      future.add_done_callback(lambda f, i=i: self._done(i, f))
      self.sent = i + 1

  def _done(self, i: int, future) -> None:
    try:
      response = future.result()
      self.latency[i] = time.time() - self.scheduled[i]
      self.version[i] = response.model_spec.version.value
      self.first_answered_at.setdefault(int(self.version[i]), time.time())
      found = self._tracked.intersection(v.decode() for v in response.outputs["ids"].string_val)
      if found:
        self.hits[i] = frozenset(found)
    except grpc.RpcError as e:
      self.failed[i] = e.code().name
    finally:
      self._outstanding.release()

  def wait_for_version(self, version: int, timeout: float) -> float:
    """When the load's first answer from `version` (or newer) arrived; sends no requests of its own."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      answered = [at for v, at in list(self.first_answered_at.items()) if v >= version]
      if answered:
        return min(answered)
      time.sleep(0.01)
    raise TimeoutError(f"version {version} did not answer within {timeout:.0f}s")

  def percentiles(self, windows: Sequence[tuple[float, float]]) -> dict[str, float | int]:
    """Answers and their p50 / p99 over the requests scheduled inside any of `windows`."""
    scheduled, latencies = self.scheduled[: self.sent], self.latency[: self.sent]
    inside = np.zeros(self.sent, bool)
    for start, end in windows:
      inside |= (scheduled >= start) & (scheduled < end)
    answered = latency.histogram_of(latencies[inside])
    return {"requests": answered.count, **latency.percentiles(answered)}


def _wait_for_log_line(path: str, text: str, process: subprocess.Popen, timeout: float) -> None:
  """Waits until `process` writes a line containing `text` to its log at `path`."""
  deadline = time.time() + timeout
  while True:
    with open(path, errors="replace") as f:
      if any(text in line for line in f):
        return
    if process.poll() is not None or time.time() > deadline:
      raise RuntimeError(f"no line with {text!r} in {path}")
    time.sleep(0.2)


def refresher_env() -> dict[str, str]:
  """The watcher's environment: with --refresher_keeps_freed_memory, glibc keeps what the refresher
  frees for its next build, as fgr-serve's --retain_freed_memory does. It shares the two cores with
  the server here, and on this VM every fresh page it touches stalls a vCPU the server needs."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  if FLAGS.refresher_keeps_freed_memory:
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"
  return env


def _plan(
  server: setup.Served, probe_request, probe_ids: list[str], source: sources.Source, row_of: dict[str, int]
) -> tuple[list[tuple], list[str], list[float]]:
  """The swaps: (rebuild?, extra lines, ad that must appear in the probe's answers, ad to exclude, ad allowed
  again) each; the new ads; and their scores over the probe's k-th on version 1."""
  new_ads, new_lines, margins = [], [], []
  for i in range(0, FLAGS.swaps, 2):
    new_ad, new_line, margin = setup.pick_probe_ad(server, probe_request, source, row_of, probe_ids, f"fresh-probe-{i}")
    new_ads.append(new_ad)
    new_lines.append(new_line)
    margins.append(round(margin, 4))
  plan = []
  paused: list[str] = []
  for i in range(FLAGS.swaps):
    target = probe_ids[1 + i]
    if i % 2 == 0:
      plan.append(
        (True, [new_lines[i // 2], json.dumps({"ad_id": target, "deleted": True})], new_ads[i // 2], target, None)
      )
    elif i == FLAGS.swaps - 2 and paused:  # Resume an ad paused earlier: it may come back.
      plan.append((False, [json.dumps({"ad_id": paused[0], "status": "active"})], None, None, paused[0]))
    else:
      paused.append(target)
      plan.append((False, [json.dumps({"ad_id": target, "status": "paused"})], None, target, None))
  return plan, new_ads, margins


def swaps_under_load(version_path: str, source: sources.Source, queries: dict[str, np.ndarray]) -> dict[str, Any]:
  """--swaps publishes by `fgr-refresh --watch` while an open-loop load runs; checks every answer."""
  base_path = setup.served_copy(version_path, "swaps")
  watch_dir = os.path.join(base_path + "-deltas")
  os.makedirs(watch_dir)
  watcher = None
  with setup.serve(base_path, "swaps-server") as server:
    try:
      requests = [setup.query_request(queries, i) for i in range(len(queries[schema.USER_ID]))]
      probe_request = requests[0]
      setup.wait_for_version(server, probe_request, 1, 600)
      _, probe_ids = setup.answer(server, probe_request)
      state = refresh_state.read_state(os.path.join(base_path, "1"))
      plan, new_ads, margins = _plan(server, probe_request, probe_ids, source, state.row_of())
      tracked = set(probe_ids[1 : 1 + FLAGS.swaps]) | set(new_ads)
      touched = set(probe_ids)

      log = open(os.path.join(FLAGS.work_dir, "swaps-refresher.log"), "wb")
      watcher = subprocess.Popen(
        [
          "nice",
          "-n",
          "10",
          sys.executable,
          "-m",
          "export.refresh_cli",
          f"--model_base_path={base_path}",
          f"--watch={watch_dir}",
          "--interval=1s",
          "--settle=0",  # setup.write_delta renames each file in whole: nothing to wait for.
          f"--keep_versions={FLAGS.refresher_keep_versions}",
          f"--index_update={FLAGS.index_update}",
          f"--defer_prune={FLAGS.refresher_defer_prune}",
          f"--verify_recall={FLAGS.watcher_verify_recall}",
          *setup.index_options_args(),
        ],
        cwd=setup.REPO,
        env=refresher_env(),
        stdout=log,
        stderr=log,
      )
      _wait_for_log_line(log.name, "Watching ", watcher, timeout=300)
      time.sleep(2)  # The steady phase starts once the watcher has read version 1 and gone idle.

      # Every 10th request is the probe query; the others cycle through the held-out queries.
      schedule = [probe_request if j % 10 == 0 else requests[j] for j in range(len(requests))]
      load = OpenLoopLoad(server, schedule, FLAGS.qps, tracked, FLAGS.max_load_seconds)
      runtime.freeze_gc()  # This process measures latency: keep its own full collections short.
      load.start()
      time.sleep(FLAGS.steady_seconds)
      steady_end = time.time()
      swaps = []
      version = 1
      for i, (rebuild, extra, _, _, _) in enumerate(plan):
        lines = setup.make_delta(state, source, FLAGS.changed_fraction, 100 + i, touched, extra) if rebuild else extra
        dropped_at = time.time()
        setup.write_delta(os.path.join(watch_dir, f"{i:03d}.jsonl"), lines)
        published_at = None
        while published_at is None:
          if time.time() - dropped_at > FLAGS.swap_timeout:
            raise TimeoutError(f"swap {i} was not published within {FLAGS.swap_timeout:.0f}s")
          if max(versions.list_versions(base_path)) > version:
            published_at = time.time()
          time.sleep(0.02)
        version += 1
        # From the load's own answers: polling with extra requests would raise the load inside the windows only.
        first_answer_at = load.wait_for_version(version, FLAGS.swap_timeout)
        time.sleep(WINDOW_AFTER_FIRST_ANSWER_S)  # Let the window end before the next delta.
        swaps.append(
          {
            "version": version,
            "kind": "rebuild" if rebuild else "status_only",
            "dropped_at": dropped_at,
            "published_at": published_at,
            "first_answer_at": first_answer_at,
            "refresher_seconds": round(published_at - dropped_at, 2),
            "publish_to_first_answer_seconds": round(first_answer_at - published_at, 2),
            "server_load_and_warmup_seconds": server.load_seconds(version),
          }
        )
      time.sleep(5)
      load.stop()
      load_stopped = time.time()
      timeline = os.path.join(FLAGS.work_dir, "swaps-timeline.npz")
      np.savez(
        timeline,
        scheduled=load.scheduled[: load.sent],
        latency=load.latency[: load.sent],
        version=load.version[: load.sent],
        swaps=np.asarray([[s["dropped_at"], s["published_at"], s["first_answer_at"]] for s in swaps]),
        versions=np.asarray([s["version"] for s in swaps]),
        steady=np.asarray([load.started, steady_end]),
      )
    finally:
      if watcher is not None:
        watcher.terminate()
        watcher.wait(60)
  host = server.fgr_serve.resources  # Sampled until the server stopped.

  # Check every answer against the plan, by the version that gave it.
  violations = []
  later_misses = 0
  for index, (_, _, must_appear, excluded, _) in enumerate(plan):
    swap_version = swaps[index]["version"]
    resumed_at = {p[4]: swaps[j]["version"] for j, p in enumerate(plan) if p[4]}
    for i in range(load.sent):
      v = load.version[i]
      if v < swap_version or i in load.failed:
        continue
      hits = load.hits.get(i, frozenset())
      # The new ad must be in the probe's answers from the version that adds it; later versions rebuild
      # the approximate index over a changed catalog, where it may fall just outside k (counted apart).
      if must_appear and i % 10 == 0 and must_appear not in hits:
        if v > swap_version:
          later_misses += 1
          continue
        violations.append(f"request {i} (version {v}): probe answer lacks {must_appear}")
      if excluded and excluded in hits and not (excluded in resumed_at and v >= resumed_at[excluded]):
        violations.append(f"request {i} (version {v}): {excluded} appears after its removal/pause")
  windows = [(s["published_at"], s["first_answer_at"] + WINDOW_AFTER_FIRST_ANSWER_S) for s in swaps]
  in_windows = load.percentiles(windows)
  builds = load.percentiles([(s["dropped_at"], s["published_at"]) for s in swaps])
  steady_interval = (load.started + 2, steady_end)
  steady = load.percentiles([steady_interval])
  steal_percent = {"steady": host.steal_percent([steady_interval]), "swap_windows": host.steal_percent(windows)}
  phases = (
    swap_phases.by_phase(
      load.scheduled[: load.sent],
      load.latency[: load.sent],
      [(s["version"], start, end) for s, (start, end) in zip(swaps, windows)],
      server.fgr_serve.log_path,
      2 * steady["p99_ms"],
    )
    if steady.get("p99_ms")
    else {}
  )
  for s in swaps:
    for key in ("dropped_at", "published_at", "first_answer_at"):
      s.pop(key)
  return {
    "qps": FLAGS.qps,
    "requests_sent": load.sent,
    "failed_requests": len(load.failed),
    "failure_codes": sorted(set(load.failed.values())),
    "steady": steady,
    "during_swap_windows": in_windows,
    "during_refresher_builds": builds,
    "windows_by_phase": phases,
    "cpu_steal_percent": steal_percent,
    "server_rss_mb": _rss_mb(host, (load.started, load_stopped), steady_interval),
    "p99_swap_over_steady": round(in_windows.get("p99_ms", 0) / steady["p99_ms"], 2) if steady.get("p99_ms") else None,
    "probe_checks_violations": len(violations),
    "violation_examples": violations[:5],
    "new_ads_score_over_kth_on_version_1": margins,
    "new_ad_missing_in_later_versions": later_misses,
    "probe_answers": int(sum(1 for i in range(load.sent) if i % 10 == 0)),
    "swaps": swaps,
  }


def _rss_mb(
  host: resources.ResourceSampler, load: tuple[float, float], steady: tuple[float, float]
) -> dict[str, float | None]:
  """The server's RSS: its most in the steady phase, its peak under load, and its last sample under load
  (after the swaps)."""

  def mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)

  return {
    "steady_max": mb(host.max_rss_bytes(*steady)),
    "peak": mb(host.max_rss_bytes(*load)),
    "end": mb(host.last_rss_bytes(before=load[1])),
  }


def saved_run_phases(work_dir: str) -> dict[str, Any]:
  """Steady p99 and the windows by phase of the swaps run saved in work_dir (timeline and server log)."""
  timeline = np.load(os.path.join(work_dir, "swaps-timeline.npz"))
  scheduled, latencies, swaps = timeline["scheduled"], timeline["latency"], timeline["swaps"]
  if "versions" in timeline:
    swap_versions = timeline["versions"]
  else:  # Saved before versions were: version 1 serves first, then one per swap.
    swap_versions = np.arange(2, 2 + len(swaps))
  # Saved before the steady phase was: it ended about when the first delta was dropped.
  started, steady_end = timeline["steady"] if "steady" in timeline else (scheduled[0], swaps[0][0])
  steady_p99 = latency.percentiles(latencies[(scheduled >= started + 2) & (scheduled < steady_end)], (99,))["p99_ms"]
  windows = [
    (int(v), published, first + WINDOW_AFTER_FIRST_ANSWER_S) for v, (_, published, first) in zip(swap_versions, swaps)
  ]
  return {
    "steady_p99_ms": steady_p99,
    "windows_by_phase": swap_phases.by_phase(
      scheduled, latencies, windows, os.path.join(work_dir, "swaps-server.log"), 2 * steady_p99
    ),
  }
