"""Two real fgr-train workers on localhost (MultiWorkerMirroredStrategy over TF_CONFIG).

One job is run the way a cluster manager runs it: both workers start, one is SIGKILLed mid-epoch,
the job is relaunched with the same TF_CONFIG and resumes from the BackupAndRestore backup. The
tests then check the resume, and that the chief's checkpoints export and the export answers.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from export import exporter
from models.data import prepare, schema, sources

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = sources.DataSpec(
  name="synthetic", synthetic={"num_ads": 1000, "num_users": 200, "num_sessions": 2500, "seed": 5}
)
BACKUP_EVERY_STEPS = 4
STARTUP_TIMEOUT_S = 240  # Bounds a hung job; the job normally takes seconds.


def _free_ports(count: int) -> list[int]:
  """Ports free right now (TF_CONFIG needs numbers); a worker may still lose one to a race, then we retry."""
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _launch(ports: list[int], data_dir: str, output_dir: str, logs: str) -> list[subprocess.Popen]:
  workers = []
  for index in range(len(ports)):
    tf_config = {
      "cluster": {"worker": [f"localhost:{port}" for port in ports]},
      "task": {"type": "worker", "index": index},
    }
    env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    flags = [
      "--data=tfrecord",
      f"--data_dir={data_dir}",
      f"--output_dir={output_dir}",
      "--distribute=multi_worker",
      f"--backup_every_steps={BACKUP_EVERY_STEPS}",
      "--embedding_dim=16",
      "--output_dim=16",
      "--hidden_units=32",
      "--features=ids_only",
      "--id_buckets=5000",
      "--epochs=2",
      "--batch_size=128",
    ]
    log = open(os.path.join(logs, f"worker{index}.log"), "a")  # noqa: SIM115  Closed with the process.
    workers.append(
      subprocess.Popen([sys.executable, "-m", "models.train_cli", *flags], cwd=REPO, env=env, stdout=log, stderr=log)
    )
  return workers


def _port_race(logs: str) -> bool:
  for name in os.listdir(logs):
    with open(os.path.join(logs, name)) as f:
      text = f.read()
    if "Address already in use" in text or "Failed to add port" in text:
      return True
  return False


def _kill(workers: list[subprocess.Popen]) -> None:
  for worker in workers:
    if worker.poll() is None:
      worker.send_signal(signal.SIGKILL)
    worker.wait()


def _wait_for(path: str, workers: list[subprocess.Popen]) -> bool:
  deadline = time.monotonic() + STARTUP_TIMEOUT_S
  while time.monotonic() < deadline:
    if os.path.exists(path):
      return True
    if any(worker.poll() is not None for worker in workers):
      return False
    time.sleep(0.05)
  return False


@pytest.fixture(scope="module")
def resumed_job(tmp_path_factory):
  """(chief's report, output_dir, data_dir) of a two-worker job killed once mid-epoch and relaunched."""
  root = tmp_path_factory.mktemp("multi_worker")
  data_dir, output_dir, logs = str(root / "data"), str(root / "run"), str(root / "logs")
  os.makedirs(logs)
  prepare.prepare(DATA, data_dir, records_per_shard=1000, progress=False)
  backup = os.path.join(output_dir, "backup", "chief", "checkpoint")
  for _ in range(3):  # Another process may take a port between choosing and binding it.
    ports = _free_ports(2)
    workers = _launch(ports, data_dir, output_dir, logs)
    started = _wait_for(backup, workers)
    _kill(workers[1:])  # SIGKILL a worker mid-epoch, once the first backup is written...
    _kill(workers[:1])  # ...and, as a cluster manager restarting the job, the chief, left blocked on it.
    if started or not _port_race(logs):
      break
  assert started, f"no backup was written; see {logs}"
  workers = _launch(ports, data_dir, output_dir, logs)
  try:
    for worker in workers:
      assert worker.wait(timeout=STARTUP_TIMEOUT_S) == 0, f"a relaunched worker failed; see {logs}"
  finally:
    _kill(workers)
  with open(os.path.join(logs, "worker0.log")) as f:
    reports = [json.loads(line) for line in f if line.startswith("{")]
  assert len(reports) == 1, "the first launch must not have finished"
  return reports[0], output_dir, data_dir


def test_a_killed_job_resumes_from_the_backup_not_from_the_start(resumed_job):
  report, output_dir, data_dir = resumed_job
  steps_per_epoch = (
    sources.open_source(sources.DataSpec(name="tfrecord", data_dir=data_dir)).num_examples("train") // 128
  )
  assert report["workers"] == 2
  # Restored with the backup's optimizer step: at least one backup's worth, short of the whole job.
  assert BACKUP_EVERY_STEPS <= report["resumed_from_step"] < 2 * steps_per_epoch
  assert report["epochs_run"] <= 2
  # The chief's checkpoints are where fgr-export reads them; workers' temporary copies are gone.
  assert tf.train.latest_checkpoint(os.path.join(output_dir, "checkpoints")).endswith("ckpt-002")
  assert not os.path.exists(os.path.join(output_dir, "backup", "chief"))


def test_the_chief_exports_and_the_export_answers(resumed_job, tmp_path):
  report, output_dir, _ = resumed_job
  assert 0 < report["test"]["top_100"] <= 1  # The chief evaluated (held-out quality is bench/input_pipeline.py's).
  config = exporter.ExportConfig(index="brute_force", k=10, eval_queries=50, num_warmup_requests=4)
  built = exporter.build_graph(output_dir, config)
  published = exporter.publish_graph(built, str(tmp_path), config)
  assert published["recall_at_10_vs_exact"] >= 0.95
  loaded = tf.saved_model.load(published["path"])
  queries = {name: tf.constant(values[:3]) for name, values in built.samples.items()}
  served = loaded.signatures["serving_default"](**queries)
  assert served["ids"].shape == (3, 10)
  assert set(served["ids"].numpy().astype(str).ravel()) <= set(built.catalog.ids)
  assert np.all(np.diff(served["scores"].numpy(), axis=1) <= 1e-6)
  assert set(built.samples) == set(schema.QUERY_FEATURE_NAMES)
