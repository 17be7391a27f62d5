"""Freshness: how fast a catalog change reaches answers, and what version swaps cost under load.

  python bench/freshness.py --work_dir=/tmp/freshness --num_ads=1000000

Trains a small model and exports it with ScaNN (both reused when already in --work_dir), serves it
with fgr-serve on 127.0.0.1, then measures:

1. Publish time. A delta changing --changed_fraction of the catalog (new, changed, removed and
   paused ads) is written; a resident refresher (as `fgr-refresh --watch` keeps one) publishes it;
   a probe query is sent every 20 ms until the new version answers. Reported: the time from the
   delta file to that first answer, split into embed / build / write (the refresher) and
   publish-to-first-answer (poll, load, warm-up, switch), with load and warm-up also measured on
   their own with fgr-serve's loader. With --compare_full, a second delta of the same size is then
   published with a full ScaNN retrain (`--index_update=full`), timed the same way, and recall@k of
   version 1, the incremental version and the retrained one is measured against exact search on
   held-out queries. A one-shot `fgr-refresh --delta` process is timed too.
2. Swaps under load. An open-loop load of --qps single-query Predicts runs for --steady_seconds,
   then `fgr-refresh --watch` (a niced subprocess) publishes --swaps deltas in a row, alternating
   rebuilds (--changed_fraction changed) and status-only changes. Every answer is checked: a new ad
   made to match the probe query (the side info of its best ad) appears in the probe's answers of
   the version that adds it; removed and paused ads appear in no answer of the versions that
   exclude them. Reported: failed requests,
   p50/p99 steady, inside the swap windows (from the publish to 3 s after the new version's first
   answer, which covers the old version's unload) and during the refresher's builds, the
   hypervisor's CPU steal in the steady phase and the windows, and the server's RSS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from bench import swap_phases  # noqa: E402
from export import exporter, refresh, refresh_delta, refresh_policy, refresh_state, version_files, versions, warmup  # noqa: E402
from models import config as config_lib  # noqa: E402
from models import train  # noqa: E402
from models.data import queries as queries_lib  # noqa: E402
from models.data import schema, sources  # noqa: E402
from serving.util import runtime  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", None, "Holds the training run, the exported version and the served copies.")
flags.DEFINE_integer("num_ads", 1_000_000, "Synthetic catalog size.")
flags.DEFINE_integer("num_sessions", 20_000, "Synthetic training sessions (a small model is enough here).")
flags.DEFINE_float("changed_fraction", 0.01, "Share of the catalog a rebuild delta touches.")
flags.DEFINE_list("index_options", [], "Index options the refresher overrides, e.g. training_sample_size=50000.")
flags.DEFINE_float("qps", 200.0, "Open-loop request rate of the swap benchmark.")
flags.DEFINE_float("steady_seconds", 30.0, "Load before the first swap (the steady p99).")
flags.DEFINE_integer("swaps", 5, "Versions published in a row under load.")
flags.DEFINE_float("swap_timeout", 300.0, "Longest wait for one swap, from delta file to answers.")
flags.DEFINE_float("max_load_seconds", 1800.0, "Hard bound on the load phase.")
flags.DEFINE_bool("measure_cli", True, "Also time a one-shot fgr-refresh process.")
flags.DEFINE_enum("index_update", "auto", list(refresh_policy.INDEX_UPDATES), "The refresher's --index_update.")
flags.DEFINE_bool("compare_full", True, "Also time a rebuild with a full ScaNN retrain, and compare recall.")
flags.DEFINE_integer("recall_queries", 500, "Held-out queries for the recall comparison.")
flags.DEFINE_bool("watcher_verify_recall", False, "Let the watcher check recall after each publish (it then "
                  "searches the new index in its own process while the server loads it).")
flags.DEFINE_bool("refresher_keeps_freed_memory", True, "Run the watcher with glibc tunables that keep "
                  "its freed memory for its next build (see _refresher_env).")
flags.DEFINE_integer("refresher_keep_versions", 3, "The watcher's --keep_versions (0 keeps all).")
flags.DEFINE_bool("refresher_defer_prune", True, "The watcher's --defer_prune.")
flags.DEFINE_list("server_flags", [], "Extra fgr-serve flags, e.g. --noretain_freed_memory.")
flags.DEFINE_enum("part", "all", ["all", "publish", "swaps", "phases"],
                  "Which measurement to run; phases re-reads the last swaps run in --work_dir and reports "
                  "where its windows' slow answers fall.")
flags.mark_flag_as_required("work_dir")

MODEL = "ads"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A swap window runs from the publish to this long after the new version's first answer, which covers
# the old version's unload.
WINDOW_AFTER_FIRST_ANSWER_S = 3.0


def ensure_version(work_dir: str) -> tuple[str, str]:
  """(training run dir, exported version path), creating what is missing."""
  run_dir = os.path.join(work_dir, f"run-{FLAGS.num_ads}")
  if not os.path.exists(os.path.join(run_dir, "config.json")):
    data = sources.DataSpec(name="synthetic", synthetic={"num_ads": FLAGS.num_ads, "num_sessions": FLAGS.num_sessions})
    train.train(data, config_lib.TowerConfig(), train.TrainConfig(epochs=1), run_dir)
  export_base = os.path.join(work_dir, f"export-{FLAGS.num_ads}")
  if not versions.list_versions(export_base):
    exporter.export_model(run_dir, export_base, exporter.ExportConfig(index="scann", eval_queries=200))
  return run_dir, os.path.join(export_base, str(versions.list_versions(export_base)[0]))


class Server:
  """fgr-serve on 127.0.0.1 (polling its base path every second) with a Predict stub."""

  def __init__(self, base_path: str, log_path: str):
    port_file = log_path + ".ports"
    if os.path.exists(port_file):  # A previous run's: it names a port nobody listens on any more.
      os.remove(port_file)
    self.log_path = log_path
    self._log = open(log_path, "wb")
    self.process = subprocess.Popen(
        [sys.executable, "-m", "serving.model_servers.main", "--port=0", f"--port_file={port_file}",
         f"--model_name={MODEL}", f"--model_base_path={base_path}", "--file_system_poll_wait_seconds=1"]
        + FLAGS.server_flags,
        cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stdout=self._log, stderr=self._log)
    deadline = time.time() + 300
    while not os.path.exists(port_file):
      if self.process.poll() is not None or time.time() > deadline:
        raise RuntimeError(f"fgr-serve did not start; see {log_path}")
      time.sleep(0.1)
    time.sleep(0.1)
    with open(port_file) as f:
      port = int(dict(line.split("=") for line in f.read().split())["grpc"])
    self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

  def load_seconds(self, version: int) -> float | None:
    """Load plus warm-up of a version, from the server's "Loading" and "Successfully loaded" log lines."""
    return swap_phases.load_seconds(swap_phases.read_log(self.log_path, time.localtime().tm_year), version)

  def cpu_seconds(self) -> float:
    """User plus system CPU time the server process has used so far."""
    with open(f"/proc/{self.process.pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

  def stop(self) -> None:
    self.channel.close()
    self.process.terminate()
    self.process.wait(60)
    self._log.close()


def answer(server: Server, request, timeout: float = 30.0) -> tuple[int, list[str]]:
  response = server.stub.Predict(request, timeout=timeout)
  return response.model_spec.version.value, [v.decode() for v in response.outputs["ids"].string_val]


def wait_for_version(server: Server, request, version: int, timeout: float) -> tuple[float, list[str]]:
  """Sends `request` every 20 ms until version `version` (or newer) answers; returns (time, ids)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    try:
      served, ids = answer(server, request)
      if served >= version:
        return time.time(), ids
    except grpc.RpcError as e:
      if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
        raise
    time.sleep(0.02)
  raise TimeoutError(f"version {version} did not answer within {timeout:.0f}s")


@dataclasses.dataclass
class Probe:
  """A query, its answer on version 1, and the catalog rows behind that answer."""

  request: Any
  ids: list[str]


def make_delta(state: refresh_state.CatalogState, source: sources.Source, fraction: float, seed: int,
               exclude: set[str], extra: list[str]) -> list[str]:
  """Delta lines touching `fraction` of the catalog: 40% new ads, 30% changed, 15% removed, 15% paused.

  Ads it changes, removes or pauses are added to `exclude`, so later deltas touch other ads (a status
  change for an ad removed earlier would be rejected).
  """
  rng = np.random.default_rng(seed)
  count = max(4, int(round(len(state.ids) * fraction)))
  counts = [int(count * share) for share in (0.4, 0.3, 0.15)]
  counts.append(count - sum(counts))
  template_rows = rng.choice(source.num_items, counts[0] + counts[1], replace=False)
  features = source.features(template_rows)
  candidates = [row for row in rng.choice(len(state.ids), 2 * sum(counts[1:]), replace=False)
                if state.ids[row] not in exclude][:sum(counts[1:])]
  exclude.update(state.ids[row] for row in candidates)
  lines = []
  for i in range(counts[0] + counts[1]):
    ad_id = f"new-{seed}-{i}" if i < counts[0] else state.ids[candidates[i - counts[0]]]
    lines.append(ad_line(ad_id, features, i))
  for row in candidates[counts[1]:counts[1] + counts[2]]:
    lines.append(json.dumps({"ad_id": state.ids[row], "deleted": True}))
  for row in candidates[counts[1] + counts[2]:]:
    lines.append(json.dumps({"ad_id": state.ids[row], "status": "paused"}))
  return lines + extra


def ad_line(ad_id: str, features: dict[str, np.ndarray], row: int) -> str:
  return json.dumps({"ad_id": ad_id, "category": str(features[schema.CATEGORY][row]),
                     "brand": str(features[schema.BRAND][row]),
                     "tokens": [str(t) for t in features[schema.AD_TOKENS][row] if t]})


def pick_probe_ad(server: Server, probe_request, source: sources.Source, row_of: dict[str, int],
                  probe_ids: list[str], ad_id_prefix: str, candidates: int = 256) -> tuple[str, str, float]:
  """A new ad that exact search puts inside the probe query's top-k, as a delta line.

  Candidates take the side info of the probe's current answers under fresh ids; the served version's
  own encode_item and encode_query (through Predict) score them, and the best one is returned with
  its margin over the probe's current k-th score.
  """
  rows = np.asarray([row_of[ad_id] for ad_id in probe_ids[:16]])
  features = source.features(rows[np.arange(candidates) % len(rows)])
  ids = np.asarray([f"{ad_id_prefix}-{j}" for j in range(candidates)], dtype=object)
  item_request = warmup.predict_request({schema.AD_ID: ids, schema.CATEGORY: features[schema.CATEGORY],
                                         schema.BRAND: features[schema.BRAND], schema.AD_TOKENS: features[schema.AD_TOKENS]},
                                        signature_name="encode_item", model_name=MODEL)
  items = tf_ndarray(server.stub.Predict(item_request, timeout=60).outputs["embedding"])
  query_request = predict_pb2.PredictRequest()
  query_request.CopyFrom(probe_request)
  query_request.model_spec.signature_name = "encode_query"
  query = tf_ndarray(server.stub.Predict(query_request, timeout=60).outputs["embedding"])[0]
  kth_score = server.stub.Predict(probe_request, timeout=60).outputs["scores"].float_val[-1]
  best = int(np.argmax(items @ query))
  return ids[best], ad_line(ids[best], features, best), float(items[best] @ query - kth_score)


def tf_ndarray(proto) -> np.ndarray:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.make_ndarray(proto)


def write_delta(path: str, lines: list[str]) -> None:
  """Writes under a hidden name and renames, as writers into a watched directory must."""
  hidden = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
  with open(hidden, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.rename(hidden, path)


def served_copy(version_path: str, name: str) -> str:
  """A new base path serving a hard-linked copy of `version_path` as version 1.

  Copies left by earlier runs (a few GB each at 1M ads, with their refreshed versions) are deleted
  first, all but the newest, which `--part=phases` and bench/load_stalls.py may still read.
  """
  earlier = sorted(n for n in os.listdir(FLAGS.work_dir) if re.fullmatch(rf"{name}-\d+(-deltas)?", n))
  stamps = sorted({n.split("-")[1] for n in earlier})
  for n in earlier:
    if n.split("-")[1] != stamps[-1]:
      shutil.rmtree(os.path.join(FLAGS.work_dir, n), ignore_errors=True)
  base_path = os.path.join(FLAGS.work_dir, f"{name}-{int(time.time())}")
  version_files.link_tree(version_path, os.path.join(base_path, "1"))
  return base_path


def probe_features(source: sources.Source, server: Server, queries: dict[str, np.ndarray]) -> Probe:
  request = warmup.predict_request({name: values[:1] for name, values in queries.items()}, model_name=MODEL)
  _, ids = answer(server, request)
  return Probe(request, ids)


def measure_load_and_warmup(version_path: str) -> dict[str, float]:
  """fgr-serve's own loader and warm-up, timed in this process."""
  from serving.servables import saved_model_bundle  # pylint: disable=g-import-not-at-top
  from serving.servables import warmup as serving_warmup  # pylint: disable=g-import-not-at-top
  started = time.perf_counter()
  bundle = saved_model_bundle.SavedModelBundle(MODEL, 0, version_path)
  loaded = time.perf_counter()
  serving_warmup.run_warmup(bundle, 1)
  warmed = time.perf_counter()
  bundle.close()
  return {"load_seconds": round(loaded - started, 2), "warmup_seconds": round(warmed - loaded, 2)}


def publish_time(version_path: str, source: sources.Source, queries: dict[str, np.ndarray]) -> dict[str, Any]:
  """Delta file → first answer from the new version, with a resident refresher."""
  import scann  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  base_path = served_copy(version_path, "publish")
  server = Server(base_path, os.path.join(FLAGS.work_dir, "publish-server.log"))
  try:
    probe_request = warmup.predict_request({name: values[:1] for name, values in queries.items()}, model_name=MODEL)
    wait_for_version(server, probe_request, 1, 600)
    _, probe_ids = answer(server, probe_request)
    refresher = refresh.Refresher(base_path, index_overrides=_index_overrides(), verify_recall=False,
                                  index_update=FLAGS.index_update)
    started = time.perf_counter()
    refresher.prepare()
    resident_seconds = time.perf_counter() - started
    state = refresher.source().state
    new_ad, new_line, margin = pick_probe_ad(server, probe_request, source, refresher.source().row_of, probe_ids,
                                             "fresh-probe-ad")
    extra = [new_line, json.dumps({"ad_id": probe_ids[1], "deleted": True}),
             json.dumps({"ad_id": probe_ids[2], "status": "paused"})]
    lines = make_delta(state, source, FLAGS.changed_fraction, 1, set(probe_ids[:3]), extra)
    delta_path = os.path.join(FLAGS.work_dir, "publish-delta.jsonl")
    write_delta(delta_path, lines)
    changed_at, cpu = time.time(), _cpu_now(server)
    report = refresher.apply(refresh_delta.read_delta(delta_path))
    published_at, cpu_published = report["published_at"], _cpu_now(server)
    first_answer_at, ids = wait_for_version(server, probe_request, report["version"], 600)
    report["cpu"] = _cpu_split(cpu, cpu_published, _cpu_now(server))
    result = {
        "catalog_items": int(len(state.ids)), "delta_lines": len(lines), "delta": report["delta"],
        "refresher_start_seconds (once, resident)": round(resident_seconds, 2),
        **_split(report, changed_at, first_answer_at, server),
        "new_probe_ad_score_over_kth": round(margin, 4),
        "new_probe_ad_in_answer": new_ad in ids,
        "removed_ad_in_answer": probe_ids[1] in ids, "paused_ad_in_answer": probe_ids[2] in ids,
        "index_options": report["index_options"],
    }
    status_lines = [json.dumps({"ad_id": probe_ids[3], "status": "paused"})]
    write_delta(delta_path, status_lines)
    changed_at = time.time()
    status_report = refresher.apply(refresh_delta.read_delta(delta_path))
    published_at = status_report["published_at"]
    first_answer_at, ids = wait_for_version(server, probe_request, status_report["version"], 600)
    result["status_only"] = {
        "change_to_first_answer_seconds": round(first_answer_at - changed_at, 2),
        "refresher_total_seconds": round(published_at - changed_at, 2),
        "publish_to_first_answer_seconds": round(first_answer_at - published_at, 2),
        "server_load_and_warmup_seconds": server.load_seconds(status_report["version"]),
        "paused_ad_in_answer": probe_ids[3] in ids,
    }
    if FLAGS.compare_full:
      refresher.index_update = "full"
      full_lines = make_delta(refresher.source().state, source, FLAGS.changed_fraction, 2, set(probe_ids[:4]), [])
      write_delta(delta_path, full_lines)
      changed_at, cpu = time.time(), _cpu_now(server)
      full_report = refresher.apply(refresh_delta.read_delta(delta_path))
      cpu_published = _cpu_now(server)
      first_answer_at, _ = wait_for_version(server, probe_request, full_report["version"], 900)
      full_report["cpu"] = _cpu_split(cpu, cpu_published, _cpu_now(server))
      result["full_retrain"] = {"delta": full_report["delta"], **_split(full_report, changed_at, first_answer_at, server)}
      refresher.index_update = FLAGS.index_update
  finally:
    server.stop()
  result.update(measure_load_and_warmup(report["path"]))
  if FLAGS.compare_full:
    recall_queries = queries_lib.held_out_queries(source, FLAGS.recall_queries)
    result[f"recall_at_{report['k']}_vs_exact_on_{len(recall_queries[schema.USER_ID])}_held_out_queries"] = {
        "version 1 (export)": version_recall(os.path.join(base_path, "1"), recall_queries),
        f"version {report['version']} ({report['index_update']})": version_recall(report["path"], recall_queries),
        f"version {full_report['version']} (full retrain)": version_recall(full_report["path"], recall_queries),
    }
  if FLAGS.measure_cli:
    write_delta(delta_path, lines)
    started = time.time()
    subprocess.run([sys.executable, "-m", "export.refresh_cli", f"--model_base_path={base_path}",
                    f"--delta={delta_path}", "--from_version=1", "--keep_versions=0"]
                   + [f"--index_options={o}" for o in FLAGS.index_options],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result["one_shot_cli_seconds (process start to published)"] = round(time.time() - started, 2)
  return result


def _cpu_now(server: Server) -> tuple[float, float]:
  """(this process's CPU seconds, the server's CPU seconds)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime, server.cpu_seconds()


def _cpu_split(start: tuple[float, float], published: tuple[float, float], answered: tuple[float, float]) -> dict[str, float]:
  """CPU seconds of the critical path: the refresher's publish, then the server up to the first answer.

  Wall time on a shared machine stretches with its load; CPU time is what the work itself costs.
  """
  refresher, server = published[0] - start[0], answered[1] - published[1] + published[1] - start[1]
  return {"refresher_cpu_seconds": round(refresher, 2), "server_cpu_seconds": round(server, 2),
          "total_cpu_seconds": round(refresher + server, 2)}


def _split(report: dict[str, Any], changed_at: float, first_answer_at: float, server: Server) -> dict[str, Any]:
  """A rebuild's time from delta file to first answer, step by step."""
  published_at = report["published_at"]
  return {
      "change_to_first_answer_seconds": round(first_answer_at - changed_at, 2),
      "index_update": report["index_update"],
      "embed_seconds": report["embed_seconds"], "build_seconds": report["build_seconds"],
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
    tensors = {name: tf.constant(values[start:start + batch_size]) for name, values in queries.items()}
    served = loaded.signatures["serving_default"](**tensors)["ids"].numpy().astype(str)
    query_embeddings = loaded.signatures["encode_query"](**tensors)["embedding"].numpy()
    scores = query_embeddings @ embeddings.T
    scores[:, ~state.eligible] = -np.inf
    exact = np.argpartition(-scores, served.shape[1], axis=1)[:, :served.shape[1]]
    found += [len(set(row) & set(state.ids[rows])) / served.shape[1] for row, rows in zip(served, exact)]
  return round(float(np.mean(found)), 4)


def _refresher_env() -> dict[str, str]:
  """The watcher's environment: with --refresher_keeps_freed_memory, glibc keeps what the refresher
  frees for its next build, as fgr-serve's --retain_freed_memory does. It shares the two cores with
  the server here, and on this VM every fresh page it touches stalls a vCPU the server needs."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  if FLAGS.refresher_keeps_freed_memory:
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"
  return env


def _index_overrides() -> dict[str, Any]:
  return exporter.parse_index_options(FLAGS.index_options)


class HostSampler:
  """Samples, every 0.5 s, the CPU time the hypervisor took from this VM (psutil's `steal`) and the
  server's resident memory.

  On a shared VM (this project's benchmark machine has 2 vCPUs) a swap window's p99 can come from the
  host: steal is reported next to the latencies so that runs with different steal are not compared as
  if alike. The server's RSS shows whether unloaded versions are released (memory stays bounded).
  """

  def __init__(self, server_pid: int):
    self.samples: list[tuple[float, float, float]] = []  # (time, cumulative steal s over all CPUs, RSS bytes)
    self._stop = threading.Event()
    try:
      import psutil  # pylint: disable=g-import-not-at-top
    except ImportError:  # An extra, as for the other benchmarks' optional tools.
      logging.warning("psutil is not installed (pip install -e '.[bench]'): CPU steal and the "
                      "server's memory are not reported")
      self._psutil = None
      return
    self._psutil = psutil
    self._server = psutil.Process(server_pid)
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while True:
      try:
        rss = float(self._server.memory_info().rss)
      except self._psutil.Error:  # The server has exited.
        rss = float("nan")
      self.samples.append((time.time(), getattr(self._psutil.cpu_times(), "steal", float("nan")), rss))
      if self._stop.wait(0.5):
        return

  def stop(self) -> None:
    self._stop.set()
    if self._psutil is not None:
      self._thread.join()

  def steal_percent(self, intervals: list[tuple[float, float]]) -> float | None:
    """Steal as a share of all CPUs' time over `intervals` (None without psutil or a steal counter)."""
    if not self.samples:
      return None
    at, steal, _ = (np.asarray(x) for x in zip(*self.samples))
    taken = sum(np.interp(end, at, steal) - np.interp(start, at, steal) for start, end in intervals)
    wall = sum(end - start for start, end in intervals) * (self._psutil.cpu_count() or 1)
    return round(100 * taken / wall, 1) if wall > 0 and not np.isnan(taken) else None

  def server_rss_mb(self, steady: tuple[float, float]) -> dict[str, float] | None:
    """The server's RSS: its most in the steady phase, its peak, and its last sample (after the swaps)."""
    if not self.samples:
      return None
    at, _, rss = (np.asarray(x) for x in zip(*self.samples))
    in_steady = rss[(at >= steady[0]) & (at < steady[1])]
    mb = lambda values: round(float(np.nanmax(values)) / 2**20, 1) if len(values) else None
    return {"steady_max": mb(in_steady), "peak": mb(rss), "end": mb(rss[-1:])}


class OpenLoopLoad:
  """Sends single-query Predicts on a fixed schedule (open loop: latency counts from the scheduled time).

  Every answer is reduced to (version, which tracked ad ids it contains).
  """

  def __init__(self, server: Server, requests: list, qps: float, tracked: set[str], max_seconds: float):
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

  def percentiles(self, start: float, end: float) -> dict[str, float | int]:
    sent = slice(0, self.sent)
    mask = (self.scheduled[sent] >= start) & (self.scheduled[sent] < end) & ~np.isnan(self.latency[sent])
    values = self.latency[sent][mask] * 1e3
    if not len(values):
      return {"requests": 0}
    p50, p99 = np.percentile(values, [50, 99])
    return {"requests": int(len(values)), "p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2)}


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


def swaps_under_load(version_path: str, source: sources.Source, queries: dict[str, np.ndarray]) -> dict[str, Any]:
  """--swaps publishes by `fgr-refresh --watch` while an open-loop load runs; checks every answer."""
  base_path = served_copy(version_path, "swaps")
  watch_dir = os.path.join(base_path + "-deltas")
  os.makedirs(watch_dir)
  server = Server(base_path, os.path.join(FLAGS.work_dir, "swaps-server.log"))
  watcher = None
  try:
    requests = [warmup.predict_request({name: values[i:i + 1] for name, values in queries.items()}, model_name=MODEL)
                for i in range(len(queries[schema.USER_ID]))]
    probe_request = requests[0]
    wait_for_version(server, probe_request, 1, 600)
    _, probe_ids = answer(server, probe_request)
    state = refresh_state.read_state(os.path.join(base_path, "1"))
    row_of = state.row_of()
    # The plan: (rebuild?, extra lines, ads that must appear in the probe's answers, ads to exclude, ads allowed again)
    new_ads, new_lines, margins = [], [], []
    for i in range(0, FLAGS.swaps, 2):
      new_ad, new_line, margin = pick_probe_ad(server, probe_request, source, row_of, probe_ids, f"fresh-probe-{i}")
      new_ads.append(new_ad)
      new_lines.append(new_line)
      margins.append(round(margin, 4))
    plan = []
    paused: list[str] = []
    for i in range(FLAGS.swaps):
      target = probe_ids[1 + i]
      if i % 2 == 0:
        plan.append((True, [new_lines[i // 2], json.dumps({"ad_id": target, "deleted": True})],
                     new_ads[i // 2], target, None))
      elif i == FLAGS.swaps - 2 and paused:  # Resume an ad paused earlier: it may come back.
        plan.append((False, [json.dumps({"ad_id": paused[0], "status": "active"})], None, None, paused[0]))
      else:
        paused.append(target)
        plan.append((False, [json.dumps({"ad_id": target, "status": "paused"})], None, target, None))
    tracked = set(probe_ids[1:1 + FLAGS.swaps]) | set(new_ads)
    touched = set(probe_ids)

    log = open(os.path.join(FLAGS.work_dir, "swaps-refresher.log"), "wb")
    watcher = subprocess.Popen(
        ["nice", "-n", "10", sys.executable, "-m", "export.refresh_cli", f"--model_base_path={base_path}",
         f"--watch={watch_dir}", "--interval=1s", f"--keep_versions={FLAGS.refresher_keep_versions}",
         f"--index_update={FLAGS.index_update}", f"--defer_prune={FLAGS.refresher_defer_prune}",
         f"--verify_recall={FLAGS.watcher_verify_recall}"]
        + [f"--index_options={o}" for o in FLAGS.index_options],
        cwd=REPO, env=_refresher_env(), stdout=log, stderr=log)
    _wait_for_log_line(log.name, "Watching ", watcher, timeout=300)
    time.sleep(2)  # The steady phase starts once the watcher has read version 1 and gone idle.

    # Every 10th request is the probe query; the others cycle through the held-out queries.
    schedule = [probe_request if j % 10 == 0 else requests[j] for j in range(len(requests))]
    load = OpenLoopLoad(server, schedule, FLAGS.qps, tracked, FLAGS.max_load_seconds)
    host = HostSampler(server.process.pid)
    runtime.freeze_gc()  # This process measures latency: keep its own full collections short.
    load.start()
    time.sleep(FLAGS.steady_seconds)
    steady_end = time.time()
    swaps = []
    version = 1
    for i, (rebuild, extra, _, _, _) in enumerate(plan):
      lines = make_delta(state, source, FLAGS.changed_fraction, 100 + i, touched, extra) if rebuild else extra
      dropped_at = time.time()
      write_delta(os.path.join(watch_dir, f"{i:03d}.jsonl"), lines)
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
      swaps.append({"version": version, "kind": "rebuild" if rebuild else "status_only",
                    "dropped_at": dropped_at, "published_at": published_at, "first_answer_at": first_answer_at,
                    "refresher_seconds": round(published_at - dropped_at, 2),
                    "publish_to_first_answer_seconds": round(first_answer_at - published_at, 2),
                    "server_load_and_warmup_seconds": server.load_seconds(version)})
    time.sleep(5)
    load.stop()
    host.stop()
    timeline = os.path.join(FLAGS.work_dir, "swaps-timeline.npz")
    np.savez(timeline, scheduled=load.scheduled[:load.sent], latency=load.latency[:load.sent],
             version=load.version[:load.sent],
             swaps=np.asarray([[s["dropped_at"], s["published_at"], s["first_answer_at"]] for s in swaps]),
             versions=np.asarray([s["version"] for s in swaps]), steady=np.asarray([load.started, steady_end]))
  finally:
    if watcher is not None:
      watcher.terminate()
      watcher.wait(60)
    server.stop()

  # Check every answer against the plan, by the version that gave it.
  violations = []
  later_misses = 0
  for index, (_, _, must_appear, excluded, resumed) in enumerate(plan):
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
  in_windows = _merge_percentiles(load, windows)
  builds = _merge_percentiles(load, [(s["dropped_at"], s["published_at"]) for s in swaps])
  steady_interval = (load.started + 2, steady_end)
  steady = load.percentiles(*steady_interval)
  steal_percent = {"steady": host.steal_percent([steady_interval]), "swap_windows": host.steal_percent(windows)}
  phases = swap_phases.by_phase(load.scheduled[:load.sent], load.latency[:load.sent],
                                [(s["version"], start, end) for s, (start, end) in zip(swaps, windows)],
                                server.log_path, 2 * steady["p99_ms"]) if steady.get("p99_ms") else {}
  for s in swaps:
    for key in ("dropped_at", "published_at", "first_answer_at"):
      s.pop(key)
  return {
      "qps": FLAGS.qps, "requests_sent": load.sent, "failed_requests": len(load.failed),
      "failure_codes": sorted(set(load.failed.values())),
      "steady": steady, "during_swap_windows": in_windows, "during_refresher_builds": builds,
      "windows_by_phase": phases, "cpu_steal_percent": steal_percent,
      "server_rss_mb": host.server_rss_mb(steady_interval),
      "p99_swap_over_steady": round(in_windows.get("p99_ms", 0) / steady["p99_ms"], 2) if steady.get("p99_ms") else None,
      "probe_checks_violations": len(violations), "violation_examples": violations[:5],
      "new_ads_score_over_kth_on_version_1": margins,
      "new_ad_missing_in_later_versions": later_misses,
      "probe_answers": int(sum(1 for i in range(load.sent) if i % 10 == 0)),
      "swaps": swaps,
  }


def _merge_percentiles(load: OpenLoopLoad, windows: list[tuple[float, float]]) -> dict[str, float | int]:
  sent = slice(0, load.sent)
  mask = np.zeros(load.sent, bool)
  for start, end in windows:
    mask |= (load.scheduled[sent] >= start) & (load.scheduled[sent] < end)
  values = load.latency[sent][mask & ~np.isnan(load.latency[sent])] * 1e3
  if not len(values):
    return {"requests": 0}
  p50, p99 = np.percentile(values, [50, 99])
  return {"requests": int(len(values)), "p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2)}


def saved_run_phases(work_dir: str) -> dict[str, Any]:
  """Steady p99 and the windows by phase of the swaps run saved in work_dir (timeline and server log)."""
  timeline = np.load(os.path.join(work_dir, "swaps-timeline.npz"))
  scheduled, latency, swaps = timeline["scheduled"], timeline["latency"], timeline["swaps"]
  if "versions" in timeline:
    swap_versions = timeline["versions"]
  else:  # Saved before versions were: version 1 serves first, then one per swap.
    swap_versions = np.arange(2, 2 + len(swaps))
  # Saved before the steady phase was: it ended about when the first delta was dropped.
  started, steady_end = timeline["steady"] if "steady" in timeline else (scheduled[0], swaps[0][0])
  steady = latency[(scheduled >= started + 2) & (scheduled < steady_end)]
  steady_p99 = float(np.nanpercentile(steady, 99)) * 1e3
  windows = [(int(v), published, first + WINDOW_AFTER_FIRST_ANSWER_S)
             for v, (_, published, first) in zip(swap_versions, swaps)]
  return {"steady_p99_ms": round(steady_p99, 2),
          "windows_by_phase": swap_phases.by_phase(scheduled, latency, windows,
                                                   os.path.join(work_dir, "swaps-server.log"), 2 * steady_p99)}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.makedirs(FLAGS.work_dir, exist_ok=True)
  if FLAGS.part == "phases":
    print(json.dumps(saved_run_phases(FLAGS.work_dir), indent=2))
    return
  run_dir, version_path = ensure_version(FLAGS.work_dir)
  _, run_config = train.restore(run_dir)
  source = sources.open_source(sources.DataSpec.from_json(run_config["data"]))
  queries = queries_lib.held_out_queries(source, 200)
  results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                             "command": " ".join(["python bench/freshness.py"] + sys.argv[1:]),
                             "version_path": version_path}
  if FLAGS.part in ("all", "publish"):
    results["publish"] = publish_time(version_path, source, queries)
    logging.info("Publish time: %s", results["publish"])
    print(json.dumps({"publish": results["publish"]}), flush=True)
  if FLAGS.part in ("all", "swaps"):
    results["swaps_under_load"] = swaps_under_load(version_path, source, queries)
  with open(os.path.join(FLAGS.work_dir, "freshness.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
