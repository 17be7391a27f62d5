"""fgr-train workers on localhost, each with its own flags, through the console script's error reporting."""

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator

from bench.fixtures import workers as workers_lib

# A tiny two-worker run over fgr-prepare's shards; tests add --data_dir, --output_dir and their own.
TINY_FLAGS = [
  "--distribute=multi_worker",
  "--data=tfrecord",
  "--embedding_dim=8",
  "--output_dim=8",
  "--hidden_units=16",
  "--features=ids_only",
  "--id_buckets=1000",
  "--cluster_timeout_seconds=120",
]


def launch(ports: list[int], flags_of: list[list[str]], log_dir: str) -> list[subprocess.Popen]:
  """Worker i runs fgr-train (its console script's error reporting) with flags_of[i]."""
  workers = []
  for index, flags in enumerate(flags_of):
    tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
    env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "PYTHONPATH": workers_lib.REPO}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    argv = ["fgr-train", *flags]
    script = f"import sys; from cli import launch; sys.argv = {argv!r}; launch.fgr_train()"
    with open(os.path.join(log_dir, f"worker{index}.log"), "w") as log:
      workers.append(
        subprocess.Popen([sys.executable, "-c", script], cwd=workers_lib.REPO, env=env, stdout=log, stderr=log)
      )
  return workers


@contextlib.contextmanager
def workers_running(flags_of: list[list[str]], log_dir: str) -> Iterator[list[subprocess.Popen]]:
  """`launch` on free ports; every worker is killed and reaped on the way out, whatever the test did."""
  workers = launch(workers_lib.free_ports(len(flags_of)), flags_of, log_dir)
  try:
    yield workers
  finally:
    for worker in workers:
      worker.kill()
      worker.wait()
