"""A worker whose peer dies mid-training stops with one line saying how to resume, not a traceback."""

import os
import signal
import time

import tensorflow as tf

from bench.fixtures import workers as workers_lib
from models import distribute
from models.data import prepare, sources
from tests.models import multi_worker_testlib

DATA = sources.DataSpec(name="synthetic", synthetic={"num_ads": 1000, "num_users": 50, "num_sessions": 300, "seed": 4})
FLAGS = [
  *multi_worker_testlib.TINY_FLAGS,
  "--batch_size=32",
  "--epochs=1000",  # Still training when its peer is killed.
]
TIMEOUT_S = 240  # Bounds a hung job.


def test_a_lost_peer_ends_the_worker_with_one_line(tmp_path):
  # The survivor printed a 60-line UnavailableError traceback ending "Restart your program to reset".
  data_dir, log_dir, output_dir = str(tmp_path / "data"), str(tmp_path / "logs"), str(tmp_path / "run")
  os.makedirs(log_dir)
  prepare.prepare(DATA, data_dir, records_per_shard=1000, progress=False)
  flags = [*FLAGS, f"--data_dir={data_dir}", f"--output_dir={output_dir}"]
  for _ in range(3):  # Another process may take a port between choosing and binding it.
    with multi_worker_testlib.workers_running([flags, flags], log_dir) as workers:
      deadline = time.monotonic() + TIMEOUT_S
      # Until the chief's first epoch is done (or a worker failed, e.g. on a port taken meanwhile).
      while not os.path.exists(os.path.join(output_dir, "config.json")) and time.monotonic() < deadline:
        if any(worker.poll() is not None for worker in workers):
          break
        time.sleep(0.05)
      workers[1].send_signal(signal.SIGKILL)
      code = workers[0].wait(timeout=TIMEOUT_S)
    if not workers_lib.lost_a_port(log_dir):
      break
  with open(os.path.join(log_dir, "worker0.log")) as f:
    log = f.read()
  assert code == 1, log[-3000:]
  assert "fgr-train: error: a worker of the cluster stopped or cannot be reached" in log, log[-3000:]
  assert f"to resume from the backup in {os.path.join(output_dir, 'backup')}" in log and "Traceback" not in log


def test_the_message_names_what_grpc_said():
  error = tf.errors.UnavailableError(
    None,
    None,
    'Graph execution error:\n{grpc_status:14, grpc_message:"recvmsg:Connection reset by peer"}\n'
    "The error could be from a previous operation. Restart your program to reset.",
  )
  message = str(distribute.worker_lost(error, "/runs/a"))
  assert message == (
    "a worker of the cluster stopped or cannot be reached (recvmsg:Connection reset by peer); relaunch every "
    "worker with the same TF_CONFIG and flags to resume from the backup in /runs/a/backup"
  )
