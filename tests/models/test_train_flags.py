"""fgr-train's flag values and TF_CONFIG are checked up front, each bad one refused in one line naming it."""

import dataclasses
import types

import pytest

from models import config as config_lib
from models import distribute
from models import train as train_lib
from models.data import sources


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("epochs", 0, "--epochs must be 1 or more, got 0"),
    ("batch_size", 0, "--batch_size must be 1 or more, got 0"),
    ("batch_size", -5, "--batch_size must be 1 or more, got -5"),
    ("mixed_negatives", -3, "--mixed_negatives must be 0 or more, got -3"),
    ("validation_k", -3, "--validation_k must be 1 or more, got -3"),
    ("early_stopping_patience", -1, "--early_stopping_patience must be 0 or more, got -1"),
    ("learning_rate", -0.1, r"--learning_rate must be above 0, got -0.1"),
    ("validation_fraction", -0.5, r"--validation_fraction must be in \[0, 1\), got -0.5"),
    ("validation_fraction", 1.0, r"--validation_fraction must be in \[0, 1\), got 1.0"),
  ],
)
def test_bad_training_values_are_refused(field, value, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    train_lib.TrainConfig(**{field: value})


@pytest.mark.parametrize("temperature", [0.0, -0.05, float("nan")])
def test_a_temperature_that_is_not_positive_is_refused(temperature):
  with pytest.raises(ValueError, match=r"^temperature must be above 0, got"):
    dataclasses.replace(config_lib.TowerConfig(), temperature=temperature)


@pytest.mark.parametrize("fraction", [-0.5, 1.0])
def test_a_held_out_item_fraction_outside_0_1_is_refused(fraction):
  values = types.SimpleNamespace(
    data="logs", data_dir="/data", split="default", held_out_item_fraction=fraction, held_out_item_seed=0
  )
  with pytest.raises(ValueError, match=r"^--held_out_item_fraction must be in \[0, 1\)"):
    sources.DataSpec.from_flags(values)


@pytest.mark.parametrize(
  "tf_config,message",
  [
    ("", "needs TF_CONFIG with a cluster"),
    ('{"cluster": ["localhost:1234"]}', "needs TF_CONFIG with a cluster"),
    ('{"cluster": {"worker": "localhost:1234"}}', r"cluster 'worker' must be a list of \"host:port\" addresses"),
    ('{"cluster": {"worker": ["localhost"]}}', r"cluster 'worker' address 'localhost' is not \"host:port\""),
    ('{"cluster": {"worker": ["localhost:http"]}}', r"address 'localhost:http' is not \"host:port\""),
    (
      '{"cluster": {"worker": ["localhost:1234"]}, "task": {"type": "worker", "index": 1}}',
      r"task .* must name a job of the cluster \['worker'\] and an index in it",
    ),
  ],
)
def test_a_bad_tf_config_is_refused_before_the_strategy_starts(monkeypatch, tf_config, message):
  monkeypatch.setenv("TF_CONFIG", tf_config)
  with pytest.raises(ValueError, match=message):
    distribute.make_strategy("multi_worker")


def test_flags_no_tower_reads_are_refused_naming_them(tmp_path):
  """Each was accepted and ignored: a channel's preset overrode --features, the text towers read no
  behaviour sequence, and the encoder's own flags did nothing without the encoder."""
  from concurrent import futures

  from tests import cli_testlib

  cases = [
    (["--channels=semantic,efficiency", "--features=ids_only"], "--features: each channel's preset sets it"),
    (["--channels=semantic", "--sequence_encoder=self_attention"], "--sequence_encoder: only full towers read"),
    (["--features=ids_only", "--sequence_encoder=self_attention"], "and these are ids_only"),
    (["--max_history=0"], "--max_history: only with --sequence_encoder=self_attention, which is off"),
  ]
  with futures.ThreadPoolExecutor(len(cases)) as pool:
    results = list(
      pool.map(
        lambda case: cli_testlib.run_console_script(["fgr-train", f"--output_dir={tmp_path / 'run'}", *case[0]]),
        cases,
      )
    )
  for (_, message), result in zip(cases, results):
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()
