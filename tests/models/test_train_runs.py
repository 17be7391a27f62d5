"""fgr-train's --output_dir: an unfinished run there is continued by the same config; nothing else touches a run."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import types

import pytest
import tensorflow as tf

from models import channels as channels_lib
from models import config as config_lib
from models import train as train_lib
from models.data import logs, sources
from tests.conftest import TINY_TOWER
from tests.data import logs_testlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
  before = _files(run_dir)
  assert train_lib.checkpoint_path(run_dir) and os.path.join(run_dir, config_lib.CONFIG_FILE) in before
  # A finished run is never trained over, not even by its own config (its weights are what fgr-export publishes).
  with pytest.raises(
    ValueError, match=r"holds a run of this config that is already trained; pass another --output_dir"
  ):
    train_lib.train(data, TINY_TOWER, TRAINING, run_dir)
  assert _files(run_dir) == before

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


class _Interrupted(Exception):
  pass


def _interrupt_after_epoch(monkeypatch, last_epoch: int) -> None:
  """Makes training stop dead after `last_epoch` (1-based) is recorded, as a SIGTERM or a crash would."""
  record = train_lib._RunProgress.on_epoch_end

  def on_epoch_end(self, epoch, logs=None):
    record(self, epoch, logs)
    if epoch + 1 == last_epoch:
      raise _Interrupted()

  monkeypatch.setattr(train_lib._RunProgress, "on_epoch_end", on_epoch_end)


def _iterations(checkpoint: str) -> int:
  reader = tf.train.load_checkpoint(checkpoint)
  return int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))


@pytest.mark.parametrize("validation_fraction", [0.0, 0.25])
def test_an_interrupted_run_is_refused_by_restore_and_continued_by_its_rerun(
  tmp_path, monkeypatch, validation_fraction
):
  data_dir, run_dir = str(tmp_path / "data"), str(tmp_path / "run")
  logs_testlib.write_tiny_logs(data_dir)
  data = sources.DataSpec(name="logs", data_dir=data_dir)
  training = dataclasses.replace(TRAINING, epochs=3, validation_fraction=validation_fraction, validation_k=5)
  with monkeypatch.context() as patch:
    _interrupt_after_epoch(patch, 2)
    with pytest.raises(_Interrupted):
      train_lib.train(data, TINY_TOWER, training, run_dir)
  # fgr-export and fgr-eval restore through train.restore: neither takes it for a finished run.
  message = (
    r"holds an unfinished training run \(interrupted after epoch 2 of 3\); rerun fgr-train with that run's flags"
  )
  with pytest.raises(ValueError, match=message):
    train_lib.restore(run_dir)
  newest = train_lib.checkpoint_path(run_dir)
  # Without validation every epoch is saved; with it, the best (here the first: the metric is 1.0 throughout).
  resumed_after = 2 if validation_fraction == 0 else 1
  assert os.path.basename(newest) == f"ckpt-{resumed_after:03d}"

  report = train_lib.train(data, TINY_TOWER, training, run_dir)
  assert report["resumed_after_epoch"] == resumed_after and report["epochs_run"] == 3
  # Model and optimizer come back: the step count goes on from the checkpoint's, not from 0.
  final = train_lib.checkpoint_path(run_dir)
  if validation_fraction == 0:
    assert os.path.basename(final) == "ckpt-003" and _iterations(final) > _iterations(newest)
  else:
    assert len(report["validation"]) == 3 and report["best_epoch"] == 1 and final == newest
  model, run_config = train_lib.restore(run_dir)
  assert run_config["run"]["state"] == "finished" and run_config["run"]["report"]["epochs_run"] == 3
  with pytest.raises(ValueError, match="already trained"):
    train_lib.train(data, TINY_TOWER, training, run_dir)


def test_runs_from_before_the_run_state_load_and_count_as_finished(tmp_path):
  data_dir, run_dir = str(tmp_path / "data"), str(tmp_path / "run")
  logs_testlib.write_tiny_logs(data_dir)
  data = sources.DataSpec(name="logs", data_dir=data_dir)
  train_lib.train(data, TINY_TOWER, TRAINING, run_dir)
  path = os.path.join(run_dir, config_lib.CONFIG_FILE)
  with open(path) as f:
    written = json.load(f)
  del written["run"]
  with open(path, "w") as f:
    json.dump(written, f)
  _, run_config = train_lib.restore(run_dir)
  assert run_config["tower"] == TINY_TOWER
  with pytest.raises(ValueError, match="already trained"):
    train_lib.train(data, TINY_TOWER, TRAINING, run_dir)


def test_a_url_output_dir_holds_config_json_too(tmp_path, monkeypatch):
  """file:// takes the path gs:// and s3:// take: tf.io.gfile, not the local file system."""
  logs_testlib.write_tiny_logs(str(tmp_path / "data"))
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "data"))
  monkeypatch.chdir(tmp_path)
  url = f"file://{tmp_path}/run"
  train_lib.train(data, TINY_TOWER, TRAINING, url)
  assert os.path.exists(tmp_path / "run" / config_lib.CONFIG_FILE) and not os.path.exists(tmp_path / "file:")
  _, run_config = train_lib.restore(url)
  assert run_config["tower"] == TINY_TOWER
  with pytest.raises(ValueError, match="another config"):
    train_lib.train(data, dataclasses.replace(TINY_TOWER, output_dim=32), TRAINING, url)
  channels_lib.write_channels(f"file://{tmp_path}/channels", ["semantic"], {})
  assert channels_lib.read_channels(f"file://{tmp_path}/channels") == ["semantic"]


def test_a_single_run_and_a_channels_run_refuse_each_others_directory(tmp_path):
  logs_testlib.write_tiny_logs(str(tmp_path / "data"))
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "data"))
  channels_dir = str(tmp_path / "channels")
  os.makedirs(channels_dir)
  channels_lib.write_channels(channels_dir, ["semantic", "efficiency"], {})
  with pytest.raises(ValueError, match=r"holds a --channels run .*channels\.json\); pass another --output_dir"):
    train_lib.train(data, TINY_TOWER, TRAINING, channels_dir)
  assert os.listdir(channels_dir) == [channels_lib.CHANNELS_FILE]
  with pytest.raises(
    ValueError, match=r"holds a --channels run of channels \['semantic', 'efficiency'\], not \['semantic'\]"
  ):
    channels_lib.check_channels_dir(channels_dir, ["semantic"])

  single_dir = str(tmp_path / "single")
  train_lib.train(data, TINY_TOWER, TRAINING, single_dir)
  with pytest.raises(ValueError, match=r"holds a single training run .*config\.json\); pass another --output_dir"):
    channels_lib.check_channels_dir(single_dir, ["semantic"])


def test_a_run_that_wrote_no_checkpoint_does_not_block_the_corrected_rerun(tmp_path):
  logs_testlib.write_tiny_logs(str(tmp_path / "data"))
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "data"))
  run_dir = str(tmp_path / "run")
  # What a run failing in its first epoch left before config.json waited for the first checkpoint.
  config_lib.write_run_config(run_dir, TINY_TOWER, data.to_json(), {**dataclasses.asdict(TRAINING), "validation_k": -3})
  train_lib.train(data, TINY_TOWER, TRAINING, run_dir)
  assert train_lib.restore(run_dir)[1]["training"]["validation_k"] == TRAINING.validation_k


def test_an_output_dir_naming_a_file_is_refused_before_the_data_is_read(tmp_path):
  (tmp_path / "run").write_text("")
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "no-such-data"))
  with pytest.raises(ValueError, match=r"^--output_dir .*run is a file, not a directory$"):
    train_lib.train(data, TINY_TOWER, TRAINING, str(tmp_path / "run"))
  with pytest.raises(ValueError, match=r"is a file, not a directory"):
    channels_lib.check_channels_dir(str(tmp_path / "run"), ["semantic"])


def test_channels_check_every_channels_fields_before_training_any(tmp_path):
  """Logs without conversions or bids: the efficiency channel's objective cannot train, so neither channel does."""
  logs_testlib.write_tiny_logs(str(tmp_path / "data"))
  argv = [
    "fgr-train",
    "--data=logs",
    f"--data_dir={tmp_path / 'data'}",
    f"--output_dir={tmp_path / 'run'}",
    "--channels=semantic,efficiency",
    "--epochs=1",
    "--batch_size=8",
    "--embedding_dim=16",
    "--output_dim=16",
    "--hidden_units=32",
    "--id_buckets=500",
  ]
  # A process of its own, as fgr-train runs: its flags would clash with other tools' in this one.
  script = f"import sys; from cli import launch; sys.argv = {argv!r}; launch.fgr_train()"
  env = {**os.environ, "PYTHONPATH": REPO_ROOT}
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT
  )
  assert result.returncode == 1, result.stderr[-3000:]
  message = "fgr-train: error: channel 'efficiency' (objective 'value') needs the example fields ['converted', 'bid']"
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert not os.path.exists(tmp_path / "run" / "semantic")


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
  training = dataclasses.replace(
    TRAINING, batch_size=batch_size, validation_fraction=validation_fraction, validation_k=5
  )
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


def test_a_diverging_run_fails_at_the_step_and_leaves_no_nan_checkpoint(tmp_path):
  # A temperature this small overflows the logits: the first step's loss is not finite.
  logs_testlib.write_tiny_logs(str(tmp_path / "data"))
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "data"))
  with pytest.raises(ValueError, match=r"training diverged: the loss is (nan|inf) at step 1 of epoch 1"):
    train_lib.train(data, dataclasses.replace(TINY_TOWER, temperature=1e-38), TRAINING, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / config_lib.CONFIG_FILE)
  assert not os.path.exists(tmp_path / "run" / train_lib.CHECKPOINT_DIR) or not os.listdir(
    tmp_path / "run" / train_lib.CHECKPOINT_DIR
  )


def test_an_empty_test_split_reports_no_accuracy_rather_than_zero(tmp_path, caplog):
  """Too few events for a test slice: the report said top-k 0.0 (every example missed) and fgr-eval
  refused the same run for having no test examples."""
  logs_testlib.write_tiny_logs(str(tmp_path / "data"), num_events=4)  # round(4 * 0.9) = 4 train, 0 test.
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "data"))
  training = dataclasses.replace(TRAINING, batch_size=2, eval_max_items=2_000_000)
  report = train_lib.train(data, TINY_TOWER, training, str(tmp_path / "run"))
  assert report["test"] is None
  assert "No test accuracy: the test split holds no examples" in caplog.text


def test_damaged_run_files_are_named_in_one_line(tmp_path):
  """A truncated checkpoint was TF's IndexError traceback; a damaged config.json json's message alone."""
  logs_testlib.write_tiny_logs(str(tmp_path / "data"))
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "data"))
  run = str(tmp_path / "run")
  train_lib.train(data, TINY_TOWER, TRAINING, run)
  checkpoint = train_lib.checkpoint_path(run)
  with open(checkpoint + ".data-00000-of-00001", "r+b") as f:
    f.truncate(100)
  with pytest.raises(ValueError, match=rf"^checkpoint {checkpoint} cannot be read \(.*\): the file is damaged"):
    train_lib.restore(run)
  config_path = os.path.join(run, config_lib.CONFIG_FILE)
  with open(config_path) as f:
    config = json.load(f)
  for text, message in [
    ("", "is not JSON"),
    (json.dumps({k: v for k, v in config.items() if k != "tower"}), "lacks 'tower'"),
  ]:
    with open(config_path, "w") as f:
      f.write(text)
    with pytest.raises(ValueError, match=rf"^{config_path} {message}.*: the file is damaged$"):
      train_lib.restore(run)


def test_a_run_records_its_data_and_tells_when_the_data_changed(tmp_path):
  """A run over changed logs: fgr-eval judged it on another held-out split, and a rerun continued an
  unfinished run over other data, both without a word."""
  data_dir = str(tmp_path / "data")
  logs_testlib.write_tiny_logs(data_dir)
  data = sources.DataSpec(name="logs", data_dir=data_dir)
  run = str(tmp_path / "run")
  train_lib.train(data, TINY_TOWER, TRAINING, run)
  assert train_lib.changed_inputs(config_lib.read_run_config(run)) == []
  with open(os.path.join(data_dir, logs.EVENTS_FILE), "a") as f:
    f.write('{"user_id": "late", "timestamp": 1e9, "ad_id": "a1"}\n')
  assert train_lib.changed_inputs(config_lib.read_run_config(run)) == [logs.EVENTS_FILE]
  # The same run, unfinished: its rerun over the changed logs is refused, and the run stays as it was.
  config_path = os.path.join(run, config_lib.CONFIG_FILE)
  with open(config_path) as f:
    config = json.load(f)
  config[config_lib.RUN] = {**config[config_lib.RUN], "state": config_lib.IN_PROGRESS, "epochs_done": 1}
  config[config_lib.RUN]["checkpoint"] = os.path.basename(train_lib.checkpoint_path(run))
  with open(config_path, "w") as f:
    json.dump(config, f)
  before = _files(run)
  with pytest.raises(ValueError, match=rf"holds an unfinished run over other data \({logs.EVENTS_FILE} changed"):
    train_lib.train(data, TINY_TOWER, TRAINING, run)
  assert _files(run) == before


# Ten events more, as the writer of a log still being written adds them.
_LATE_EVENTS = "".join(json.dumps({"user_id": "u1", "timestamp": t, "ad_id": "a1"}) + "\n" for t in range(64, 74))


def test_logs_written_to_while_the_run_opens_them_are_refused_before_it_writes(tmp_path, monkeypatch):
  """Events appended after the source counted its split: config.json recorded the longer file, so
  fgr-eval, whose split of that file moved, did not warn that the data changed since training."""
  data_dir, run = str(tmp_path / "data"), str(tmp_path / "run")
  logs_testlib.write_tiny_logs(data_dir)
  events = os.path.join(data_dir, logs.EVENTS_FILE)
  open_source = sources.open_source

  def opened_then_appended(spec):
    source = open_source(spec)
    with open(events, "a") as f:
      f.write(_LATE_EVENTS)
    return source

  monkeypatch.setattr(train_lib.sources, "open_source", opened_then_appended)
  data = sources.DataSpec(name="logs", data_dir=data_dir)
  with pytest.raises(ValueError, match=rf"^{re.escape(events)} changed while fgr-train read it, .*finished files"):
    train_lib.train(data, TINY_TOWER, TRAINING, run)
  assert not _files(run) and not os.path.exists(os.path.join(run, train_lib.CHECKPOINT_DIR))


def test_channels_refuse_logs_written_to_while_they_are_opened(tmp_path):
  """--channels opens the source once for every channel: each channel recorded the files as they were
  when it began, which could be longer than the ones the shared source had counted."""
  data_dir, run = tmp_path / "data", tmp_path / "run"
  logs_testlib.write_tiny_logs(str(data_dir))
  events = str(data_dir / logs.EVENTS_FILE)
  argv = ["fgr-train", "--data=logs", f"--data_dir={data_dir}", f"--output_dir={run}", "--channels=semantic"]
  argv += ["--epochs=1", "--batch_size=8", "--embedding_dim=16", "--output_dim=16", "--hidden_units=32"]
  # A process of its own, as fgr-train runs, whose source is followed by a writer's late events.
  script = f"""
import sys
from cli import launch
from models.data import sources
open_source = sources.open_source
def opened_then_appended(spec):
  source = open_source(spec)
  with open({events!r}, "a") as f:
    f.write({_LATE_EVENTS!r})
  return source
sources.open_source = opened_then_appended
sys.argv = {argv!r}
launch.fgr_train()
"""
  env = {**os.environ, "PYTHONPATH": REPO_ROOT}
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT
  )
  assert result.returncode == 1, result.stderr[-3000:]
  message = f"fgr-train: error: {events} changed while fgr-train read it"
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert not os.path.exists(run)


def test_a_channels_run_says_which_channel_each_training_is(tmp_path):
  """Each channel's Keras epochs and test accuracy came one after the other, naming no channel."""
  argv = [
    "fgr-train",
    "--num_ads=50",
    "--num_users=10",
    "--num_sessions=40",
    f"--output_dir={tmp_path / 'run'}",
    "--channels=semantic,efficiency",
  ]
  # Each channel's training is replaced by a stub: only what the run says around it is looked at.
  script = (
    "import sys; from absl import logging; from models import train; "
    "train.train = lambda data, tower, *args: logging.info('trained %s', tower.features) or {}; "
    f"from cli import launch; sys.argv = {argv!r}; launch.fgr_train()"
  )
  env = {**os.environ, "PYTHONPATH": REPO_ROOT}
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT
  )
  assert result.returncode == 0, result.stderr[-3000:]
  said = [
    line.split("] ", 1)[1] for line in result.stderr.splitlines() if "] Training channel" in line or "] trained" in line
  ]
  assert said == [
    "Training channel semantic (1 of 2)",
    "trained text",
    "Training channel efficiency (2 of 2)",
    "trained full",
  ]
