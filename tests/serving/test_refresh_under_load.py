"""fgr-refresh publishing versions while fgr-serve answers a steady stream of
Predicts: every request succeeds, and each version's answers reflect its
catalog (bench/freshness.py and bench/swap_phases.py measure the same swap at
scale; this checks its correctness, small and bounded)."""

import threading
import time

import grpc
import numpy as np
import pytest
import scann_testlib as scann_lib
import serving_testlib as lib

from export import refresh, refresh_delta
from models.data import schema

CLIENTS = 3
# Hang guards only: the clients run until stopped, outlasting every wait below together (3 x 120 s plus
# the refreshes, which take minutes on loaded cores); a count bound of ~130 s had stopped them early.
CLIENT_SECONDS = 600
MAX_REQUESTS_PER_CLIENT = 200_000
PAUSE_BETWEEN_REQUESTS = 0.005  # Leaves the shared cores to the server and the refresh.


class _Load:
  """Client threads sending one request each, in a loop, until stopped or
  bounded; they record (version, ids) per answer and every failure."""

  def __init__(self, port: int, requests):
    self.answers, self.failures = [], []
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._threads = [threading.Thread(target=self._run, args=(port, r)) for r in requests]
    for thread in self._threads:
      thread.start()

  def _run(self, port, message):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = lib.prediction_service_pb2_grpc.PredictionServiceStub(channel)
    deadline = time.time() + CLIENT_SECONDS
    for _ in range(MAX_REQUESTS_PER_CLIENT):
      if self._stop.is_set() or time.time() > deadline:
        break
      try:
        response = stub.Predict(message, timeout=60)
        answer = (response.model_spec.version.value, scann_lib.ids_and_scores(response)[0])
        with self._lock:
          self.answers.append(answer)
      except grpc.RpcError as e:
        with self._lock:
          self.failures.append((e.code().name, e.details()))
      time.sleep(PAUSE_BETWEEN_REQUESTS)
    channel.close()

  def count(self, version: int) -> int:
    with self._lock:
      return sum(1 for v, _ in self.answers if v == version)

  def stop(self):
    self._stop.set()
    for thread in self._threads:
      thread.join(90)
    assert not any(thread.is_alive() for thread in self._threads)


def _record(features, row: int, **changes) -> refresh_delta.AdRecord:
  """An ad's delta record from catalog features, with `changes` applied."""
  tokens = tuple(t for t in features[schema.AD_TOKENS][row].astype(str) if t)
  values = dict(category=str(features[schema.CATEGORY][row]), brand=str(features[schema.BRAND][row]), tokens=tokens)
  values.update(changes)
  return refresh_delta.AdRecord(**values)


@pytest.mark.usefixtures("native")
def test_refreshed_versions_swap_under_load(trained_run, tree_export, tmp_path):
  base = str(tmp_path / "ads")
  scann_lib.copy_version(tree_export, base)
  v1 = scann_lib.catalog(tree_export)
  queries = scann_lib.held_out_queries(trained_run, 4)
  probe = {name: values[:1] for name, values in queries.items()}
  proc = lib.ServerProcess(
    ["--model_name=ads", f"--model_base_path={base}", "--file_system_poll_wait_seconds=1"], str(tmp_path)
  )
  load = None
  try:
    first = proc.predict.Predict(scann_lib.request(probe, "ads"), timeout=60)
    assert first.model_spec.version.value == 1
    top3 = set(scann_lib.ids_and_scores(first)[0][0, :3])
    # Two single-query clients (ScaNN's single-query op), one batch of 4.
    load = _Load(proc.grpc_port, [scann_lib.request(probe, "ads")] * 2 + [scann_lib.request(queries, "ads")])
    lib.wait_for(lambda: load.count(1) >= 20, timeout=120)

    # Version 2: 5 new ads, 3 changed ones (re-embedded), the probe's top 3
    # paused. An incremental ScaNN update under version 1's graph.
    rows = [row for row in np.flatnonzero(v1.eligible) if v1.ids[row] not in top3][:20]  # Active ads to change or keep.
    features = scann_lib.item_features(trained_run, np.asarray(rows))
    refresher = refresh.Refresher(base)
    delta = refresh_delta.CatalogDelta()
    for i in range(5):
      delta.add_upsert(f"fresh-{i}", _record(features, i))
    for i in range(5, 8):
      delta.add_upsert(str(v1.ids[rows[i]]), _record(features, i, tokens=("t3_1", "t3_7")))
    for ad_id in top3:
      delta.add_status(ad_id, "paused")
    report = refresher.apply(delta)
    assert report["version"] == 2 and report["delta"]["added"] == 5
    assert report["delta"]["changed"] == 3, report["delta"]
    lib.wait_for(lambda: load.count(2) >= 20, timeout=120)
    v2 = scann_lib.catalog(report["path"])
    # At its widest knobs the search is exact: NumPy over version 2's
    # catalog (changed embeddings, new ads, mask) answers the same.
    embedding = scann_lib.query_embeddings(proc.predict, "ads", probe)
    widest = proc.predict.Predict(
      scann_lib.request(
        probe,
        "ads",
        "search_with_options",
        leaves_to_search=scann_lib.NUM_LEAVES,
        pre_reorder_num_neighbors=len(v2.ids),
      ),
      timeout=60,
    )
    assert widest.model_spec.version.value == 2
    assert scann_lib.recall(scann_lib.ids_and_scores(widest)[0], scann_lib.exact_ids(embedding, v2)) >= 0.9

    # Version 3: a new ad, and every ad paused but 10, three of them added
    # in version 2: every answer is exactly those 10 (the exact fallback).
    keep = {f"fresh-{i}" for i in range(3)} | {"fresh-5"} | {str(v1.ids[row]) for row in rows[10:16]}
    delta = refresh_delta.CatalogDelta()
    delta.add_upsert("fresh-5", _record(features, 18))
    for ad_id in np.asarray(v2.ids)[v2.eligible]:
      if ad_id not in keep:
        delta.add_status(str(ad_id), "paused")
    report = refresher.apply(delta)
    assert report["version"] == 3 and report["num_eligible"] == 10
    lib.wait_for(lambda: load.count(3) >= 20, timeout=120)
  finally:
    if load is not None:
      load.stop()
    code = proc.terminate()
  assert code == 0, proc.stderr()[-3000:]

  assert load.failures == [], load.failures[:5]
  by_version = {}
  for version, ids in load.answers:
    by_version.setdefault(version, []).append(ids)
  assert sorted(by_version) == [1, 2, 3]
  v2_eligible = set(np.asarray(v2.ids)[v2.eligible])
  for ids in by_version[2]:
    assert ids.shape[1] == scann_lib.K and set(ids.ravel()) <= v2_eligible
    assert not set(ids.ravel()) & top3
  for ids in by_version[3]:
    assert all(set(row) == keep for row in ids), ids
