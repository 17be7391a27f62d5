"""fgr-train's --output_dir: a run there is continued only by the same config, never damaged by a failed one."""

import dataclasses
import json
import os
import types

import pytest

from models import config as config_lib
from models import train as train_lib
from models.data import logs, sources
from tests.conftest import TINY_TOWER
from tests.data import logs_testlib

TRAINING = train_lib.TrainConfig(epochs=1, batch_size=8, eval_max_items=0)


def _files(run_dir: str) -> dict[str, bytes]:
  """config.json and the checkpoints of a run, by path, with their bytes."""
  found = {}
  for root, _, names in os.walk(run_dir):
    for name in names:
      path = os.path.join(root, name)
      if name == config_lib.CONFIG_FILE or train_lib.CHECKPOINT_DIR in path:
        with open(path, "rb") as f:
          found[path] = f.read()
  return found


def _break_events(data_dir: str) -> None:
  with open(os.path.join(data_dir, logs.EVENTS_FILE), "a") as f:
    f.write('{"timestamp": 1e12, "ad_id": "no-such-ad"}\n')


def test_bad_data_leaves_no_config_in_a_new_dir(tmp_path):
  logs_testlib.write_tiny_logs(str(tmp_path / "data"))
  _break_events(str(tmp_path / "data"))
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "data"))
  with pytest.raises(ValueError, match="no-such-ad"):
    train_lib.train(data, TINY_TOWER, TRAINING, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / config_lib.CONFIG_FILE)


def test_a_failed_or_different_run_leaves_the_existing_run_as_it_was(tmp_path):
  data_dir, run_dir = str(tmp_path / "data"), str(tmp_path / "run")
  logs_testlib.write_tiny_logs(data_dir)
  data = sources.DataSpec(name="logs", data_dir=data_dir)
  train_lib.train(data, TINY_TOWER, TRAINING, run_dir)
  # The same config may run again (as a relaunched job continues its run).
  train_lib.train(data, TINY_TOWER, TRAINING, run_dir)
  before = _files(run_dir)
  assert train_lib.checkpoint_path(run_dir) and os.path.join(run_dir, config_lib.CONFIG_FILE) in before

  wider = dataclasses.replace(TINY_TOWER, output_dim=32)
  with pytest.raises(ValueError, match=r"holds a training run of another config \(tower\.output_dim: 16 there, 32 now"):
    train_lib.train(data, wider, TRAINING, run_dir)
  assert _files(run_dir) == before

  _break_events(data_dir)
  for tower in (TINY_TOWER, wider):
    with pytest.raises(ValueError):
      train_lib.train(data, tower, TRAINING, run_dir)
    assert _files(run_dir) == before
  model, run_config = train_lib.restore(run_dir)
  assert run_config["tower"] == TINY_TOWER and model.query_tower is not None


def test_a_relative_data_dir_is_recorded_absolute_so_the_run_opens_from_anywhere(tmp_path, monkeypatch):
  logs_testlib.write_tiny_logs(str(tmp_path / "data"))
  monkeypatch.chdir(tmp_path)
  data_flags = types.SimpleNamespace(
    data="logs", data_dir="data", split="default", held_out_item_fraction=0.0, held_out_item_seed=0
  )
  recorded = json.loads(json.dumps(sources.DataSpec.from_flags(data_flags).to_json()))
  monkeypatch.chdir(tmp_path.parent)  # fgr-export started from another directory
  assert sources.open_source(sources.DataSpec.from_json(recorded)).num_items == 8
  remote = types.SimpleNamespace(**{**vars(data_flags), "data": "tfrecord", "data_dir": "gs://bucket/prepared"})
  assert sources.DataSpec.from_flags(remote).data_dir == "gs://bucket/prepared"


def test_an_empty_training_split_names_the_events_file_and_its_count(tmp_path):
  logs_testlib.write_tiny_logs(str(tmp_path / "data"), num_events=0)
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "data"))
  message = r"the training split has no examples: .*events.jsonl holds 0 events, 0 of them before the test split"
  with pytest.raises(ValueError, match=message):
    train_lib.train(data, TINY_TOWER, TRAINING, str(tmp_path / "run"))


# 20 events: 18 training examples, 14 of them left to train on beside a validation slice of 0.25.
@pytest.mark.parametrize("validation_fraction,batch_size,examples", [(0.0, 32, 18), (0.25, 16, 14)])
def test_fewer_training_examples_than_a_batch_ask_for_a_lower_batch_size(
  tmp_path, validation_fraction, batch_size, examples
):
  logs_testlib.write_tiny_logs(str(tmp_path / "data"), num_events=20)
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "data"))
  training = dataclasses.replace(TRAINING, batch_size=batch_size, validation_fraction=validation_fraction)
  message = rf"^{examples} training examples make no batch of {batch_size}: lower --batch_size$"
  with pytest.raises(ValueError, match=message):
    train_lib.train(data, TINY_TOWER, training, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / config_lib.CONFIG_FILE)


def test_a_catalog_smaller_than_a_reported_k_is_recalled_whole(tmp_path):
  """8 items and the default top-1/10/50/100 report: top-k at k >= 8 is every item (TF's top-k refused it)."""
  logs_testlib.write_tiny_logs(str(tmp_path / "data"))
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "data"))
  report = train_lib.train(
    data, TINY_TOWER, dataclasses.replace(TRAINING, eval_max_items=2_000_000), str(tmp_path / "run")
  )
  test = report["test"]
  assert test["top_10"] == test["top_50"] == test["top_100"] == 1.0
  assert 0.0 <= test["top_1"] <= 1.0
