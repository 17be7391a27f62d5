"""make demo: train on synthetic search-ads logs, export with ScaNN, serve, query, report, shut down.

Every step runs the same console scripts a user runs (fgr-train, fgr-export, fgr-serve, fgr-query), as
subprocesses, so the demo exercises the product exactly as documented.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags

from cli import launch

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "output_dir",
  "demo_output",
  "Where the training run, models and logs go: a new or empty directory, or an earlier demo's (replaced).",
)
flags.DEFINE_integer("num_ads", 20_000, "Synthetic catalog size.")
flags.DEFINE_integer("num_sessions", 60_000, "Synthetic query sessions.")
flags.DEFINE_integer("epochs", 3, "Training epochs.")
flags.DEFINE_integer("latency_requests", 300, "Predict calls timed for the p50 latency.")

BIN = os.path.dirname(sys.executable)
MODEL_NAME = "retrieval"
# Everything the demo writes into --output_dir: a directory holding nothing else is an earlier demo's.
OUTPUTS = frozenset(
  (
    "train",
    "models",
    "train.log",
    "export.log",
    "requests.jsonl",
    "ports.txt",
    "serve.log",
    "query_one.log",
    "query.log",
  )
)


def prepare_output_dir(path: str) -> str:
  """Empties an earlier demo's output directory (or makes a new one) and returns its absolute path.

  It was removed whatever it held: `--output_dir=.` or a typo naming a run deleted the user's files.
  A directory holding anything the demo does not write is refused, and left as it is.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    sys.exit(f"demo: --output_dir={path} is a file; name a directory")
  if os.path.isdir(path):
    others = sorted(set(os.listdir(path)) - OUTPUTS)
    if others:
      shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
      sys.exit(
        f"demo: --output_dir={path} holds files the demo did not write ({shown}); it replaces only an earlier "
        "demo's output: name a new or empty directory"
      )
    shutil.rmtree(path)
  os.makedirs(path)
  return os.path.abspath(path)


def _exit_on_sigterm() -> None:
  """SIGTERM ends the demo through SystemExit, so that the `finally` blocks stop the tool it is running
  and the server: Python's default SIGTERM left them running, writing into the output directory."""

  def stop(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, stop)


def _stop(process: subprocess.Popen, timeout: float = 60.0) -> None:
  """Stops a child still running (SIGTERM, then SIGKILL after `timeout` seconds) and reaps it."""
  if process.poll() is None:
    process.terminate()
    try:
      process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


def _step(title: str) -> float:
  print(f"\n=== {title}", flush=True)
  return time.time()


def _run(args: list[str], log_path: str, capture: bool = True) -> str:
  """Runs a console script, logs its stderr, returns its stdout's last line (with `capture`; else the
  stdout is shown); fails loudly. A demo stopped meanwhile stops the script too."""
  with open(log_path, "w") as log:
    stdout = subprocess.PIPE if capture else None
    process = subprocess.Popen([os.path.join(BIN, args[0]), *args[1:]], stdout=stdout, stderr=log, text=True)
    try:
      out, _ = process.communicate()
    finally:
      _stop(process)
  if process.returncode != 0:
    sys.exit(f"{args[0]} failed (exit {process.returncode}); see {log_path}")
  return out.strip().splitlines()[-1] if out and out.strip() else ""


def _wait_for_server(process: subprocess.Popen, port_file: str, timeout: float = 180.0) -> int:
  """Waits until the server has written its port and the model is AVAILABLE; returns the gRPC port."""
  import grpc  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc  # pylint: disable=g-import-not-at-top

  deadline = time.time() + timeout
  while time.time() < deadline:
    if process.poll() is not None:
      sys.exit(f"fgr-serve exited early with {process.returncode}")
    if os.path.exists(port_file):
      ports = dict(line.split("=") for line in open(port_file).read().split())
      if "grpc" in ports:
        port = int(ports["grpc"])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
          request = get_model_status_pb2.GetModelStatusRequest()
          request.model_spec.name = MODEL_NAME
          try:
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=5)
            if any(v.state == v.AVAILABLE for v in status.model_version_status):
              return port
          except grpc.RpcError:
            pass
    time.sleep(0.5)
  sys.exit("fgr-serve did not make the model available in time")


def main(argv: list[str]) -> None:
  del argv
  _exit_on_sigterm()
  try:
    demo(prepare_output_dir(FLAGS.output_dir))
  except KeyboardInterrupt:
    sys.stderr.write("\ndemo: interrupted\n")
    raise SystemExit(launch.INTERRUPTED_STATUS) from None


def demo(out: str) -> None:
  """Trains, exports, serves and queries under `out`, and prints the figures."""
  train_dir, base_path = os.path.join(out, "train"), os.path.join(out, "models", MODEL_NAME)
  figures: dict[str, object] = {}
  started = time.time()

  t = _step(f"fgr-train: {FLAGS.num_ads} synthetic ads, {FLAGS.num_sessions} sessions, {FLAGS.epochs} epochs")
  report = json.loads(
    _run(
      [
        "fgr-train",
        f"--output_dir={train_dir}",
        f"--num_ads={FLAGS.num_ads}",
        f"--num_sessions={FLAGS.num_sessions}",
        f"--epochs={FLAGS.epochs}",
      ],
      os.path.join(out, "train.log"),
    )
  )
  figures["test_top_100_accuracy"] = round(report["test"]["top_100"], 4)
  print(f"trained in {time.time() - t:.0f}s; held-out top-100 accuracy {figures['test_top_100_accuracy']}")

  t = _step("fgr-export --index=scann")
  report = json.loads(
    _run(
      ["fgr-export", f"--checkpoint_dir={train_dir}", f"--model_base_path={base_path}", "--index=scann", "--k=100"],
      os.path.join(out, "export.log"),
    )
  )
  figures["index_recall_at_100_vs_exact"] = report["recall_at_100_vs_exact"]
  print(f"exported version {report['version']} in {time.time() - t:.0f}s to {report['path']}")

  t = _step("Recall of the exported SavedModel (ScaNN in the graph) against exact search")
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
  import scann  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  from export import verify  # pylint: disable=g-import-not-at-top
  from models.data import queries as queries_lib  # pylint: disable=g-import-not-at-top
  from models.data import schema, sources  # pylint: disable=g-import-not-at-top

  with open(os.path.join(train_dir, "config.json")) as f:
    source = sources.open_source(sources.DataSpec.from_json(json.load(f)["data"]))
  queries = queries_lib.held_out_queries(source, 500)
  figures["saved_model_recall_at_100_vs_exact"] = round(verify.saved_model_recall(report["path"], source, queries), 4)
  print(f"recall@100 = {figures['saved_model_recall_at_100_vs_exact']} over 500 held-out queries")
  requests_file = os.path.join(out, "requests.jsonl")
  with open(requests_file, "w") as f:
    for i in range(50):
      f.write(
        json.dumps({name: (values[i].tolist() if values.ndim == 2 else values[i]) for name, values in queries.items()})
        + "\n"
      )

  t = _step("fgr-serve on 127.0.0.1 (a free port)")
  port_file = os.path.join(out, "ports.txt")
  server_log = open(os.path.join(out, "serve.log"), "w")
  server = subprocess.Popen(
    [
      os.path.join(BIN, "fgr-serve"),
      "--port=0",
      f"--port_file={port_file}",
      f"--model_name={MODEL_NAME}",
      f"--model_base_path={base_path}",
    ],
    stdout=server_log,
    stderr=subprocess.STDOUT,
  )
  try:
    port = _wait_for_server(server, port_file)
    print(f"serving version {report['version']} on 127.0.0.1:{port} after {time.time() - t:.0f}s")

    _step("fgr-query: one request's candidates")
    first = json.loads(open(requests_file).readline())
    print(
      f"query tokens {[q for q in first[schema.QUERY_TOKENS] if q]}, "
      f"last clicks {[h for h in first[schema.HIST_IDS] if h][:3]}"
    )
    _run(
      [
        "fgr-query",
        f"--server=127.0.0.1:{port}",
        f"--model_name={MODEL_NAME}",
        f"--requests_file={requests_file}",
        "--num_requests=1",
        "--top=5",
      ],
      os.path.join(out, "query_one.log"),
      capture=False,
    )

    _step(f"fgr-query: p50/p99 latency of {FLAGS.latency_requests} gRPC Predict calls (k=100)")
    latency = json.loads(
      _run(
        [
          "fgr-query",
          f"--server=127.0.0.1:{port}",
          f"--model_name={MODEL_NAME}",
          f"--requests_file={requests_file}",
          f"--num_requests={FLAGS.latency_requests}",
          "--json",
        ],
        os.path.join(out, "query.log"),
      )
    )
    figures["grpc_predict_p50_ms"] = latency["p50_ms"]
    figures["grpc_predict_p99_ms"] = latency["p99_ms"]
    print(f"p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms")
  finally:
    _step("Shutting down (SIGTERM, drain)")
    _stop(server)
    server_log.close()
    print(f"fgr-serve exited with {server.returncode}")
  figures["total_seconds"] = round(time.time() - started)
  print("\n=== Figures")
  print(json.dumps(figures, indent=2))


if __name__ == "__main__":
  launch.prepare_tensorflow(sys.argv)  # The recall step imports TensorFlow in this process.
  app.run(main)
