"""Two real fgr-train workers on localhost (MultiWorkerMirroredStrategy over TF_CONFIG).

One job is run the way a cluster manager runs it: both workers start, one is SIGKILLed mid-epoch,
the job is relaunched with the same TF_CONFIG and resumes from the BackupAndRestore backup. The
tests then check the resume, and that the chief's checkpoints export and the export answers.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from bench.fixtures import workers as workers_lib
from export import exporter
from models.data import prepare, schema, sources

# About 16 steps of 128 an epoch: the first backup comes well before the job's end, and each backup
# (a checkpoint write on every step that is a multiple of BACKUP_EVERY_STEPS) costs as much as a few steps.
DATA = sources.DataSpec(
  name="synthetic", synthetic={"num_ads": 1000, "num_users": 200, "num_sessions": 1500, "seed": 5}
)
BACKUP_EVERY_STEPS = 8
FLAGS = [
  "--data=tfrecord",
  f"--backup_every_steps={BACKUP_EVERY_STEPS}",
  "--embedding_dim=16",
  "--output_dim=16",
  "--hidden_units=32",
  "--features=ids_only",
  "--id_buckets=5000",
  "--epochs=2",
  "--batch_size=128",
]
STARTUP_TIMEOUT_S = 240  # Bounds a hung job; the job normally takes seconds.


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
  flags = [*FLAGS, f"--data_dir={data_dir}", f"--output_dir={output_dir}"]
  for _ in range(3):  # Another process may take a port between choosing and binding it.
    ports = workers_lib.free_ports(2)
    workers = workers_lib.launch(ports, flags, logs)
    started = _wait_for(backup, workers)
    _kill(workers[1:])  # SIGKILL a worker mid-epoch, once the first backup is written...
    _kill(workers[:1])  # ...and, as a cluster manager restarting the job, the chief, left blocked on it.
    if started or not workers_lib.lost_a_port(logs):
      break
  assert started, f"no backup was written; see {logs}"
  workers = workers_lib.launch(ports, flags, logs)
  try:
    for worker in workers:
      assert worker.wait(timeout=STARTUP_TIMEOUT_S) == 0, f"a relaunched worker failed; see {logs}"
  finally:
    _kill(workers)
  reports = workers_lib.reports(os.path.join(logs, "worker0.log"))
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


def _start_worker(ports: list[int], flags: list[str], log_path: str) -> subprocess.Popen:
  """Worker 0 alone of a cluster of len(ports) workers."""
  tf_config = {"cluster": {"worker": [f"localhost:{port}" for port in ports]}, "task": {"type": "worker", "index": 0}}
  env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "PYTHONPATH": workers_lib.REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
  with open(log_path, "w") as log:
    return subprocess.Popen(
      [sys.executable, "-m", "models.train_cli", "--distribute=multi_worker", *flags],
      cwd=workers_lib.REPO,
      env=env,
      stdout=log,
      stderr=log,
    )


def test_a_worker_whose_peer_never_starts_gives_up_with_one_line(resumed_job, tmp_path):
  # TF's coordination service waits for every task, holding the GIL, and takes SIGTERM meanwhile:
  # without the watchdog process this worker waited for good, and only SIGKILL ended it.
  _, _, data_dir = resumed_job
  log_path = str(tmp_path / "worker0.log")
  flags = [*FLAGS, f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'run'}", "--cluster_timeout_seconds=3"]
  worker = _start_worker(workers_lib.free_ports(2), flags, log_path)
  try:
    assert worker.wait(timeout=STARTUP_TIMEOUT_S) == -signal.SIGKILL
  finally:
    _kill([worker])
  with open(log_path) as f:
    assert "fgr-train: error: the cluster in TF_CONFIG" in f.read()


def test_sigterm_stops_a_worker_and_the_run_is_left_to_resume(resumed_job, tmp_path):
  # TF's preemption notifier took SIGTERM, and a stopped worker trained on to the end.
  _, _, data_dir = resumed_job
  log_path, output_dir = str(tmp_path / "worker0.log"), str(tmp_path / "run")
  flags = [*FLAGS, f"--data_dir={data_dir}", f"--output_dir={output_dir}", "--epochs=1000"]
  flags.remove("--epochs=2")
  worker = _start_worker(workers_lib.free_ports(1), flags, log_path)
  try:
    assert _wait_for(os.path.join(output_dir, "backup", "chief", "checkpoint"), [worker]), f"see {log_path}"
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=STARTUP_TIMEOUT_S) == 128 + signal.SIGTERM
  finally:
    _kill([worker])
  with open(log_path) as f:
    assert "SIGTERM: stopping this worker" in f.read()
