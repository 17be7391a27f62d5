"""fgr-train keeps a run's newest checkpoints only (`--keep_checkpoints`), not every epoch's."""

from __future__ import annotations

import dataclasses
import os

import pytest
import tensorflow as tf

from models import train as train_lib
from models.data import sources
from tests.conftest import TINY_TOWER
from tests.data import logs_testlib

TRAINING = train_lib.TrainConfig(epochs=1, batch_size=8, eval_max_items=0)


def _epochs_on_disk(run_dir: str) -> list[int]:
  names = os.listdir(os.path.join(run_dir, train_lib.CHECKPOINT_DIR))
  return sorted({int(n.split(".")[0].rsplit("-", 1)[1]) for n in names if n.endswith(".index")})


def _listed_in_state(run_dir: str) -> list[str]:
  state = tf.train.get_checkpoint_state(os.path.join(run_dir, train_lib.CHECKPOINT_DIR))
  return [os.path.basename(path) for path in state.all_model_checkpoint_paths]


@pytest.mark.parametrize("keep,kept", [(2, [3, 4]), (0, [1, 2, 3, 4])])
def test_older_checkpoints_are_deleted_as_each_epoch_is_written(tmp_path, keep, kept):
  """Every epoch's was kept: 164 MB each at the default towers, 8 GB for a 50-epoch run."""
  data_dir, run_dir = str(tmp_path / "data"), str(tmp_path / "run")
  logs_testlib.write_tiny_logs(data_dir)
  data = sources.DataSpec(name="logs", data_dir=data_dir)
  train_lib.train(data, TINY_TOWER, dataclasses.replace(TRAINING, epochs=4), run_dir, keep_checkpoints=keep)
  assert _epochs_on_disk(run_dir) == kept
  # The state file names only what is there, the newest last (Keras's own names the newest alone).
  listed = _listed_in_state(run_dir)
  assert set(listed) <= {f"ckpt-{epoch:03d}" for epoch in kept} and listed[-1] == "ckpt-004"
  assert os.path.basename(train_lib.checkpoint_path(run_dir)) == "ckpt-004"
  train_lib.restore(run_dir)


def test_a_negative_count_is_refused_before_anything_is_written(tmp_path):
  run_dir = str(tmp_path / "run")
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "absent"))
  with pytest.raises(ValueError, match=r"--keep_checkpoints must be 0 \(keep every epoch's\) or more, got -1"):
    train_lib.train(data, TINY_TOWER, TRAINING, run_dir, keep_checkpoints=-1)
  assert not os.path.exists(run_dir)
