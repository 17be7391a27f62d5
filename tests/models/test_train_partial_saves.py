"""A checkpoint save that never finished (killed, or failed on a full disk) neither blocks nor outlives the run."""

import dataclasses
import errno
import os

import pytest

from models import train as train_lib
from models.data import sources
from tests.conftest import TINY_TOWER
from tests.data import logs_testlib

TRAINING = train_lib.TrainConfig(epochs=2, batch_size=8, eval_max_items=0)


def _partial_save(run_dir: str, epoch: int) -> str:
  """What a save of epoch's checkpoint killed part-way leaves: its _temp directory with a partial shard."""
  temp = os.path.join(run_dir, train_lib.CHECKPOINT_DIR, f"ckpt-{epoch:03d}_temp")
  os.makedirs(temp, exist_ok=True)
  with open(os.path.join(temp, "part-00000-of-00001.data-00000-of-00001.tempstate123"), "wb") as f:
    f.write(b"\0" * 4096)
  return temp


class _Killed(Exception):
  pass


def _stop_after_first_epoch(monkeypatch, run_dir: str) -> None:
  """After epoch 1 is recorded, leaves epoch 2's save half done and stops, as kill -9 in that save would."""
  record = train_lib._RunProgress.on_epoch_end

  def on_epoch_end(self, epoch, logs=None):
    record(self, epoch, logs)
    _partial_save(run_dir, epoch + 2)
    raise _Killed()

  monkeypatch.setattr(train_lib._RunProgress, "on_epoch_end", on_epoch_end)


def test_a_killed_save_does_not_stop_the_rerun_continuing(tmp_path, monkeypatch):
  data_dir, run_dir = str(tmp_path / "data"), str(tmp_path / "run")
  logs_testlib.write_tiny_logs(data_dir)
  data = sources.DataSpec(name="logs", data_dir=data_dir)
  with monkeypatch.context() as patch:
    _stop_after_first_epoch(patch, run_dir)
    with pytest.raises(_Killed):
      train_lib.train(data, TINY_TOWER, TRAINING, run_dir)
  temp = _partial_save(run_dir, 2)  # The failure path cleaned up; kill -9 runs no cleanup.
  # It failed every rerun with "invalid literal for int() with base 10: '002_temp'".
  report = train_lib.train(data, TINY_TOWER, TRAINING, run_dir)
  assert report["resumed_after_epoch"] == 1 and report["epochs_run"] == 2
  assert not os.path.exists(temp)
  assert os.path.basename(train_lib.checkpoint_path(run_dir)) == "ckpt-002"


def test_a_save_failing_on_a_full_disk_gives_its_space_back(tmp_path, monkeypatch):
  data_dir, run_dir = str(tmp_path / "data"), str(tmp_path / "run")
  logs_testlib.write_tiny_logs(data_dir)
  data = sources.DataSpec(name="logs", data_dir=data_dir)
  record = train_lib._RunProgress.on_epoch_end

  def on_epoch_end(self, epoch, logs=None):
    record(self, epoch, logs)
    _partial_save(run_dir, epoch + 2)
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(train_lib._RunProgress, "on_epoch_end", on_epoch_end)
  with pytest.raises(OSError, match="No space left"):
    train_lib.train(data, TINY_TOWER, dataclasses.replace(TRAINING, epochs=1), run_dir)
  # The finished checkpoint stays; the half-written one is gone.
  assert sorted(os.listdir(os.path.join(run_dir, train_lib.CHECKPOINT_DIR))) == [
    "checkpoint",
    "ckpt-001.data-00000-of-00001",
    "ckpt-001.index",
  ]
