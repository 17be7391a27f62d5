"""Tower widths, weights and seeds out of range are refused naming their fgr-train flag, before anything runs."""

import dataclasses

import pytest

from models import config as config_lib
from models import train as train_lib


@pytest.mark.parametrize(
  "field,value,message",
  [
    # --output_dim=0 reached oneDNN, which aborted the process (status 134) at the first step.
    ("output_dim", 0, r"--output_dim must be 1 or more, got 0"),
    ("embedding_dim", 0, r"--embedding_dim must be 1 or more, got 0"),
    ("id_buckets", -1, r"--id_buckets must be 1 or more, got -1"),
    ("token_buckets", 0, r"--token_buckets must be 1 or more, got 0"),
    ("hidden_units", (16, 0), r"--hidden_units must all be 1 or more, got \[16, 0\]"),
    ("temperature", float("inf"), r"temperature must be above 0 and finite, got inf"),
    ("relevance_weight", float("nan"), r"--relevance_weight must be a finite number, 0 or more, got nan"),
    ("conversion_weight", float("inf"), r"--conversion_weight must be a finite number, 0 or more, got inf"),
    ("bid_exponent", -1.0, r"--bid_exponent must be a finite number, 0 or more, got -1.0"),
  ],
)
def test_bad_tower_values_are_refused(field, value, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    dataclasses.replace(config_lib.TowerConfig(), **{field: value})


def test_an_empty_hidden_units_list_is_still_a_tower():
  assert config_lib.TowerConfig(hidden_units=()).hidden_units == ()


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("seed", -1, r"--seed must be in \[0, 2\*\*32\), got -1"),
    ("seed", 2**32, r"--seed must be in \[0, 2\*\*32\), got 4294967296"),
    ("learning_rate", float("inf"), r"--learning_rate must be finite, got inf"),
    # One example a step and no sampled negatives: the softmax has one class, the loss is 0.
    ("batch_size", 1, r"--batch_size=1 leaves each example no in-batch negative, .*--mixed_negatives"),
  ],
)
def test_bad_training_values_are_refused(field, value, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    train_lib.TrainConfig(**{field: value})


def test_hidden_units_that_are_not_integers_name_the_flag():
  with pytest.raises(ValueError, match=r"^--hidden_units must be a comma-separated list of integers, got '64,abc'$"):
    config_lib.parse_hidden_units(["64", "abc"])
  assert config_lib.parse_hidden_units(["64", "32"]) == (64, 32)


def test_one_example_a_step_trains_beside_sampled_negatives():
  assert train_lib.TrainConfig(batch_size=1, mixed_negatives=8).batch_size == 1
