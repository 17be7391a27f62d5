"""Benchmark: which step of loading a version stalls the requests another version is answering.

  python -m bench.load_stalls --serving=models/ads/1 --loading=models/ads/2

One thread answers single `Predict`s (the serving version's warm-up requests, replayed through
fgr-serve's `predict_util`) on an open-loop schedule; meanwhile the main thread loads the other
version one step at a time, and each step's request latencies are reported (p50 / p99 / max, from
the scheduled send time). Steps:
- `import_graph`: parsing the SavedModel and `import_graph_def` into a fresh graph;
- `restore_on_shared_pools`: RestoreV2 of the variables as TF's loader runs it, in the session's pools;
- `fgr_serve_load`: the whole `SavedModelBundle` load (import, restore in the load thread pinned to
  one CPU, init);
- `first_request`: the loaded version's first Predict (e.g. ScaNN's deserialisation);
- `close_and_collect`: closing the loaded version and the garbage collection that frees it.
With --freeze_gc (fgr-serve's default) start-up objects are frozen first, as fgr-serve does.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import scann  # noqa: E402,F401  # pylint: disable=unused-import  # Registers the Scann ops before loading.
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402
from tensorflow.python.saved_model import loader_impl  # noqa: E402
from tensorflow_serving.apis import prediction_log_pb2  # noqa: E402

from bench.fixtures import latency  # noqa: E402
from cli import launch
from serving.servables import predict_util, saved_model_bundle, warmup  # noqa: E402
from serving.util import runtime  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("serving", None, "Version directory that answers requests.")
flags.DEFINE_string("loading", None, "Version directory loaded step by step meanwhile.")
flags.DEFINE_float("qps", 200.0, "Open-loop rate of the answering thread.")
flags.DEFINE_integer("rounds", 2, "Times every step is repeated.")
flags.DEFINE_bool("freeze_gc", True, "Freeze start-up objects out of the GC first, as fgr-serve does.")
flags.mark_flags_as_required(["serving", "loading"])


def _requests(version_path: str) -> list:
  path = os.path.join(version_path, warmup.WARMUP_FILE)
  return [
    prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
    for record in tf.data.TFRecordDataset(path)
  ]


def _latencies_during(
  action: Callable[[], None], answer: Callable[[int], None], qps: float
) -> tuple[float, list[float]]:
  """Runs `action` while another thread calls `answer(i)` at `qps`; (action seconds, latencies in seconds)."""
  latencies, stop = [], threading.Event()

  def answering() -> None:
    started, i = time.perf_counter(), 0
    while not stop.is_set():
      due = started + i / qps
      if due > time.perf_counter():
        time.sleep(due - time.perf_counter())
      answer(i)
      latencies.append(time.perf_counter() - due)
      i += 1

  thread = threading.Thread(target=answering)
  thread.start()
  time.sleep(0.5)
  started = time.perf_counter()
  action()
  seconds = time.perf_counter() - started
  time.sleep(0.5)
  stop.set()
  thread.join()
  return seconds, latencies


def main(argv: list[str]) -> None:
  del argv
  requests = _requests(FLAGS.serving)
  serving = saved_model_bundle.SavedModelBundle("serving", 1, FLAGS.serving)
  for request in requests * 3:
    predict_util.run_predict(serving, request)
  if FLAGS.freeze_gc:
    runtime.freeze_gc()
  loaded: dict[str, object] = {}

  def import_graph() -> None:
    graph = tf.Graph()
    loaded.update(
      graph=graph, session=tf.compat.v1.Session(graph=graph), loader=loader_impl.SavedModelLoader(FLAGS.loading)
    )
    with graph.as_default():
      loaded["saver"], _ = loaded["loader"].load_graph(graph, ["serve"])

  def restore_on_shared_pools() -> None:
    saver_def = loaded["saver"].saver_def
    loaded["session"].run(
      saver_def.restore_op_name, {saver_def.filename_tensor_name: os.path.join(FLAGS.loading, "variables", "variables")}
    )
    loaded.pop("session").close()
    loaded.clear()

  def fgr_serve_load() -> None:
    loaded["bundle"] = saved_model_bundle.SavedModelBundle("loading", 2, FLAGS.loading)

  def first_request() -> None:
    predict_util.run_predict(loaded["bundle"], requests[0])

  def close_and_collect() -> None:
    loaded.pop("bundle").close()
    gc.collect()

  steps = [import_graph, restore_on_shared_pools, fgr_serve_load, first_request, close_and_collect]
  print(f"{'step':24s} {'seconds':>8s} {'p50 ms':>7s} {'p99 ms':>7s} {'max ms':>7s}")
  for _ in range(FLAGS.rounds):
    for step in [lambda: time.sleep(1.0)] + steps:
      seconds, latencies = _latencies_during(
        step, lambda i: predict_util.run_predict(serving, requests[i % len(requests)]), FLAGS.qps
      )
      name = getattr(step, "__name__", "idle")
      name = "idle" if name == "<lambda>" else name
      p = latency.percentiles(latencies)
      print(f"{name:24s} {seconds:8.3f} {p['p50_ms']:7.2f} {p['p99_ms']:7.2f} {1e3 * max(latencies):7.1f}", flush=True)
  serving.close()


if __name__ == "__main__":
  launch.run_module(main)
