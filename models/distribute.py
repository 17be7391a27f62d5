"""Multi-worker training on tf.distribute: the strategy, input sharding, global negatives, fault tolerance.

`MultiWorkerMirroredStrategy` keeps a copy of every variable on each worker and all-reduces the
gradients, so N workers with a per-worker batch of B/N take the same steps as one process with a
batch of B, provided the loss sees the same candidates: each worker all-gathers the batch's item
embeddings and ids, so its queries are scored against the global batch's items, not only its own.
The cluster comes from `TF_CONFIG`, as every TensorFlow cluster manager sets it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from typing import Any

import tensorflow as tf
from absl import logging

STRATEGIES = ("none", "multi_worker")
BACKUP_DIR = "backup"
_FINGERPRINTS = (1 << 63) - 1  # Buckets of the ids' fingerprints: collisions are vanishingly rare.


def make_strategy(name: str, cluster_timeout_seconds: float = 600.0) -> tf.distribute.Strategy:
  """The strategy `--distribute` names; create it before any other TensorFlow op runs.

  Under multi_worker, SIGTERM then stops this worker at its next step (`_stop_on_sigterm`).

  Args:
    name: "none" (this process alone) or "multi_worker" (`MultiWorkerMirroredStrategy` over the
      cluster in the TF_CONFIG environment variable).
    cluster_timeout_seconds: with multi_worker, how long to wait for every task of the cluster to
      start; past it the process prints one line naming the cluster and is killed (status 137).
  """
  if name == "none":
    return tf.distribute.get_strategy()
  if name != "multi_worker":
    raise ValueError(f"Unknown --distribute={name!r}; choose one of {STRATEGIES}")
  if not cluster_timeout_seconds > 0:
    raise ValueError(f"--cluster_timeout_seconds must be above 0, got {cluster_timeout_seconds}")
  cluster = _checked_cluster(os.environ.get("TF_CONFIG", ""))
  logging.info("Multi-worker training over %s", cluster)
  # The constructor waits in C++ until every task has registered, holding the GIL, and TF's
  # coordination service takes SIGTERM meanwhile (its preemption notifier only records it): a
  # missing peer held this process for good. Only another process can end the wait.
  message = (
    f"fgr-train: error: the cluster in TF_CONFIG ({json.dumps(cluster)}) did not start within "
    f"{cluster_timeout_seconds:g} s (--cluster_timeout_seconds): start every task, and check each one "
    "reaches the others' addresses"
  )
  watchdog = subprocess.Popen(
    [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(cluster_timeout_seconds), message],
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL,
  )
  try:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  finally:
    watchdog.kill()
    watchdog.wait()
  _stop_on_sigterm()
  return strategy


# Run by a child process: past the timeout, print the message (stderr is the worker's) and SIGKILL
# the worker; exit quietly if the worker has gone.
_WATCHDOG = """
import os, signal, sys, time
parent, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
  if os.getppid() != parent:
    sys.exit(0)
  time.sleep(0.2)
sys.stderr.write(message + "\\n")
sys.stderr.flush()
os.kill(parent, signal.SIGKILL)
"""


def _stop_on_sigterm() -> None:
  """Makes SIGTERM stop training at the next step, with status 143.

  TF's coordination service had replaced the handler with a preemption notifier that only records
  the signal, so a worker stopped by its cluster manager trained on to the end. A relaunched job
  resumes from the last `BackupAndRestore` backup. (Signal handlers can only be set from the main
  thread; elsewhere TF's notifier stays.)
  """
  if threading.current_thread() is not threading.main_thread():
    return

  def stop(signum: int, frame: object) -> None:
    del frame
    logging.warning("SIGTERM: stopping this worker; relaunch the job with the same flags to resume from its backup")
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, stop)


_JOBS = ("worker", "chief")  # The jobs whose tasks train under MultiWorkerMirroredStrategy.
_TF_CONFIG_EXAMPLE = '{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}'


def _checked_cluster(tf_config: str) -> dict[str, list[str]]:
  """The cluster of a TF_CONFIG value, checked: a ValueError names what is wrong, before TensorFlow reads it.

  A cluster is a map of job name to a list of "host:port" addresses; the task, when given, names a
  job of the cluster and an index within it.
  """
  try:
    config = json.loads(tf_config)
  except ValueError:
    config = None
  cluster = config.get("cluster") if isinstance(config, dict) else None
  if not isinstance(cluster, dict) or not cluster:
    raise ValueError(
      "--distribute=multi_worker needs TF_CONFIG with a cluster mapping job names to lists of "
      f'"host:port", e.g. {_TF_CONFIG_EXAMPLE}; got {tf_config!r}'
    )
  for job, addresses in cluster.items():
    if job not in _JOBS:
      # MultiWorkerMirroredStrategy waited for such a task, which no fgr-train runs, until the
      # cluster timeout, whose message then said the cluster "did not start".
      raise ValueError(
        f"TF_CONFIG: cluster job {job!r} is not one MultiWorkerMirroredStrategy runs; list every worker "
        f"under {' or '.join(map(repr, _JOBS))} (a parameter server has nothing to do in mirrored training)"
      )
    if not isinstance(addresses, list) or not addresses:
      raise ValueError(f'TF_CONFIG: cluster {job!r} must be a list of "host:port" addresses, got {addresses!r}')
    for address in addresses:
      host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
      if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'TF_CONFIG: cluster {job!r} address {address!r} is not "host:port"')
  task = config.get("task")
  if task is not None:
    job = task.get("type") if isinstance(task, dict) else None
    index = task.get("index") if isinstance(task, dict) else None
    if job not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[job]):
      raise ValueError(f"TF_CONFIG: task {task!r} must name a job of the cluster {sorted(cluster)} and an index in it")
  return cluster


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes the run's outputs (config.json, checkpoints, logs, the report)."""
  return bool(strategy.extended.should_checkpoint)


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """Input pipelines of the cluster (each worker, and a chief if there is one, runs one)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None:
    return 1
  cluster = resolver.cluster_spec().as_dict()
  return max(1, sum(len(cluster.get(job, [])) for job in ("chief", "worker")))


def shard_by_files(dataset: tf.data.Dataset, num_files: int, workers: int) -> tf.data.Dataset:
  """Auto-shards between workers by file when each gets at least one, by record otherwise."""
  policy = tf.data.experimental.AutoShardPolicy
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = policy.FILE if num_files >= workers else policy.DATA
  return dataset.with_options(options)


def global_candidates(
  item_embeddings: tf.Tensor, candidate_ids: tf.Tensor, probabilities: tf.Tensor | None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]:
  """This replica's positives and every other replica's, its own first (the loss's diagonal).

  Outside a multi-replica step this is the identity. Inside one, the embeddings, the ids and the
  sampling probabilities (logQ) are all-gathered. The all-gather's gradient sums what every
  replica's loss says about this replica's items, so the item tower learns from the global batch.
  The candidates are rotated so row i is still this replica's i-th positive, as
  `tfrs.tasks.Retrieval` assumes; the softmax does not depend on their order. Collectives carry no
  strings, so ids travel as 64-bit fingerprints, which is all accidental-hit removal compares.
  """
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return item_embeddings, candidate_ids, probabilities
  local = {"embeddings": item_embeddings, "ids": tf.strings.to_hash_bucket_fast(candidate_ids, _FINGERPRINTS)}
  if probabilities is not None:
    local["probabilities"] = probabilities
  # A worker with one device runs its replica without a device scope, and all_gather sends a
  # tensor to the device it was made on: name that device.
  devices = context.strategy.extended.worker_devices
  with tf.device(devices[0]) if len(devices) == 1 else contextlib.nullcontext():
    local = {name: tf.identity(value) for name, value in local.items()}
  # One collective per tensor: a batched all-gather concatenates its tensors, which needs one dtype.
  gathered = {name: context.all_gather(value, axis=0) for name, value in local.items()}
  shift = -tf.cast(context.replica_id_in_sync_group, tf.int32) * tf.shape(item_embeddings)[0]
  rolled = {name: tf.roll(value, shift, axis=0) for name, value in gathered.items()}
  return rolled["embeddings"], rolled["ids"], rolled.get("probabilities")


def check_same_run(strategy: tf.distribute.Strategy, description: dict[str, Any]) -> None:
  """Refuses to train unless every worker of the cluster was given the same run (`description`).

  Each worker takes its steps per epoch, tensor shapes and collectives from its own flags and
  data. Workers given different ones (another --batch_size, or a --data_dir prepared from other
  data) issued mismatched collectives: after tens of seconds each died with a gRPC "Collective
  instance ... expected type" or "tasks have crashed" traceback, or waited on the other for good.
  The workers all-gather a 63-bit hash of their description, once, before training.

  Args:
    strategy: a `MultiWorkerMirroredStrategy` (any other one has no peer to disagree with).
    description: what must agree: the run's config without paths, and the data's manifest.
  """
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return
  digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).digest()
  mine = tf.constant([int.from_bytes(digest[:8], "big") >> 1], tf.int64)

  @tf.function
  def gather() -> tf.Tensor:
    context = tf.distribute.get_replica_context()
    devices = context.strategy.extended.worker_devices
    with tf.device(devices[0]) if len(devices) == 1 else contextlib.nullcontext():
      return context.all_gather(tf.identity(mine), axis=0)

  gathered = strategy.experimental_local_results(strategy.run(gather))[0].numpy().tolist()
  if len(set(gathered)) > 1:
    groups: dict[int, list[int]] = {}
    for replica, value in enumerate(gathered):
      groups.setdefault(value, []).append(replica)
    raise ValueError(
      "the workers of TF_CONFIG's cluster were given different runs (flags or fgr-prepare data); the replicas, "
      f"grouped by the run they were given: {' / '.join(str(group) for group in groups.values())}. Start every "
      "worker with the same flags and a --data_dir holding the same fgr-prepare output"
    )


class WorkerLost(ConnectionError):
  """A peer of the cluster stopped or became unreachable during training: the environment, not a bug."""


_PEER_REASON = re.compile(r'grpc_message:"([^"]+)"|(The following tasks are unhealthy[^\n]*)')


def worker_lost(error: tf.errors.UnavailableError, output_dir: str) -> WorkerLost:
  """The one-line error of a collective that failed because a peer went away, with what to do next.

  TensorFlow's own message is a graph-execution traceback ending "Restart your program to reset";
  what happened is in a gRPC message inside it ("Connection reset by peer", "tasks are unhealthy").
  """
  found = _PEER_REASON.search(str(error))
  reason = f" ({next(group for group in found.groups() if group)})" if found else ""
  return WorkerLost(
    f"a worker of the cluster stopped or cannot be reached{reason}; relaunch every worker with the same "
    f"TF_CONFIG and flags to resume from the backup in {os.path.join(output_dir, BACKUP_DIR)}"
  )


class ResumeLog(tf.keras.callbacks.Callback):
  """Records the step training starts from, which is above 0 when `BackupAndRestore` restored a backup."""

  def __init__(self):
    super().__init__()
    self.initial_step = 0

  def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
    self.initial_step = int(self.model.optimizer.iterations.numpy())
    if self.initial_step:
      logging.info("Resumed from the backup at step %d", self.initial_step)


def fault_tolerance(output_dir: str, save_every_steps: int) -> tuple[list[tf.keras.callbacks.Callback], ResumeLog]:
  """`BackupAndRestore` under output_dir/backup (every `save_every_steps` steps, or each epoch if 0).

  A relaunched job (same TF_CONFIG, same output_dir) restores the model, optimizer and position in
  the epoch from it. The chief writes it; the other workers write to temporary directories that
  Keras deletes. The backup is deleted when training completes.
  """
  resume = ResumeLog()
  backup = tf.keras.callbacks.BackupAndRestore(
    os.path.join(output_dir, BACKUP_DIR), save_freq=save_every_steps or "epoch"
  )
  return [backup, resume], resume
