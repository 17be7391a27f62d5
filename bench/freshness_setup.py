"""The freshness benchmark's shared setup: its flags, the model it serves, deltas and the probe query.

bench/freshness.py runs the phases (bench/freshness_publish.py, bench/freshness_swaps.py); both
serve a hard-linked copy of one exported version with fgr-serve and change its catalog with deltas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Iterator

import grpc
import numpy as np
from absl import flags
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench import swap_phases
from bench.fixtures import servers
from export import exporter, refresh_policy, refresh_state, version_files, versions, warmup
from models import config as config_lib
from models import train
from models.data import schema, sources

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
flags.DEFINE_bool(
  "watcher_verify_recall",
  False,
  "Let the watcher check recall after each publish (it then "
  "searches the new index in its own process while the server loads it).",
)
flags.DEFINE_bool(
  "refresher_keeps_freed_memory",
  True,
  "Run the watcher with glibc tunables that keep "
  "its freed memory for its next build (see freshness_swaps.refresher_env).",
)
flags.DEFINE_integer("refresher_keep_versions", 3, "The watcher's --keep_versions (0 keeps all).")
flags.DEFINE_bool("refresher_defer_prune", True, "The watcher's --defer_prune.")
flags.DEFINE_list("server_flags", [], "Extra fgr-serve flags, e.g. --noretain_freed_memory.")
flags.DEFINE_enum(
  "part",
  "all",
  ["all", "publish", "swaps", "phases"],
  "Which measurement to run; phases re-reads the last swaps run in --work_dir and reports "
  "where its windows' slow answers fall.",
)
flags.mark_flag_as_required("work_dir")

MODEL = "ads"
REPO = servers.REPO


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


@dataclasses.dataclass
class Served:
  """fgr-serve on a freshness base path (polling it every second) and a Predict stub to it."""

  fgr_serve: servers.ServerProcess
  stub: prediction_service_pb2_grpc.PredictionServiceStub

  def load_seconds(self, version: int) -> float | None:
    """Load plus warm-up of a version, from the server's "Loading" and "Successfully loaded" log lines."""
    return swap_phases.load_seconds(swap_phases.read_log(self.fgr_serve.log_path, time.localtime().tm_year), version)


@contextlib.contextmanager
def serve(base_path: str, name: str) -> Iterator[Served]:
  """fgr-serve (with --server_flags) on base_path, logging to --work_dir/<name>.log, until the block ends."""
  with (
    servers.fgr_serve(
      FLAGS.work_dir, MODEL, base_path, ["--file_system_poll_wait_seconds=1", *FLAGS.server_flags], name=name
    ) as server,
    grpc.insecure_channel(server.address) as channel,
  ):
    yield Served(server, prediction_service_pb2_grpc.PredictionServiceStub(channel))


def query_request(queries: dict[str, np.ndarray], row: int) -> predict_pb2.PredictRequest:
  """A single-query Predict on serving_default for row `row` of the held-out queries."""
  return warmup.predict_request({name: values[row : row + 1] for name, values in queries.items()}, model_name=MODEL)


def answer(server: Served, request, timeout: float = 30.0) -> tuple[int, list[str]]:
  response = server.stub.Predict(request, timeout=timeout)
  return response.model_spec.version.value, [v.decode() for v in response.outputs["ids"].string_val]


def wait_for_version(server: Served, request, version: int, timeout: float) -> tuple[float, list[str]]:
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


def make_delta(
  state: refresh_state.CatalogState,
  source: sources.Source,
  fraction: float,
  seed: int,
  exclude: set[str],
  extra: list[str],
) -> list[str]:
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
  candidates = [
    row for row in rng.choice(len(state.ids), 2 * sum(counts[1:]), replace=False) if state.ids[row] not in exclude
  ][: sum(counts[1:])]
  exclude.update(state.ids[row] for row in candidates)
  lines = []
  for i in range(counts[0] + counts[1]):
    ad_id = f"new-{seed}-{i}" if i < counts[0] else state.ids[candidates[i - counts[0]]]
    lines.append(ad_line(ad_id, features, i))
  for row in candidates[counts[1] : counts[1] + counts[2]]:
    lines.append(json.dumps({"ad_id": state.ids[row], "deleted": True}))
  for row in candidates[counts[1] + counts[2] :]:
    lines.append(json.dumps({"ad_id": state.ids[row], "status": "paused"}))
  return lines + extra


def ad_line(ad_id: str, features: dict[str, np.ndarray], row: int) -> str:
  return json.dumps(
    {
      "ad_id": ad_id,
      "category": str(features[schema.CATEGORY][row]),
      "brand": str(features[schema.BRAND][row]),
      "tokens": [str(t) for t in features[schema.AD_TOKENS][row] if t],
    }
  )


def pick_probe_ad(
  server: Served,
  probe_request,
  source: sources.Source,
  row_of: dict[str, int],
  probe_ids: list[str],
  ad_id_prefix: str,
  candidates: int = 256,
) -> tuple[str, str, float]:
  """A new ad that exact search puts inside the probe query's top-k, as a delta line.

  Candidates take the side info of the probe's current answers under fresh ids; the served version's
  own encode_item and encode_query (through Predict) score them, and the best one is returned with
  its margin over the probe's current k-th score.
  """
  rows = np.asarray([row_of[ad_id] for ad_id in probe_ids[:16]])
  features = source.features(rows[np.arange(candidates) % len(rows)])
  ids = np.asarray([f"{ad_id_prefix}-{j}" for j in range(candidates)], dtype=object)
  item_request = warmup.predict_request(
    {
      schema.AD_ID: ids,
      schema.CATEGORY: features[schema.CATEGORY],
      schema.BRAND: features[schema.BRAND],
      schema.AD_TOKENS: features[schema.AD_TOKENS],
    },
    signature_name="encode_item",
    model_name=MODEL,
  )
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


def index_options_args() -> list[str]:
  """fgr-refresh's --index_options flags for --index_options."""
  return [f"--index_options={o}" for o in FLAGS.index_options]
