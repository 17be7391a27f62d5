"""fgr-train's --validation_k must leave part of the catalog out, or the validation metric is 1.0 every epoch."""

import dataclasses
import os

import pytest

from models import config as config_lib
from models import train as train_lib
from models.data import sources
from tests.conftest import TINY_TOWER
from tests.data import logs_testlib

TRAINING = train_lib.TrainConfig(epochs=2, batch_size=8, eval_max_items=0, validation_fraction=0.25)


@pytest.mark.parametrize("k", [8, 100])
def test_a_validation_k_holding_the_whole_catalog_is_refused_before_training(tmp_path, k):
  logs_testlib.write_tiny_logs(str(tmp_path / "data"))  # 8 ads.
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "data"))
  message = rf"^--validation_k must be below the catalog size \(8 items\) for validation to tell epochs apart, got {k}$"
  with pytest.raises(ValueError, match=message):
    train_lib.train(data, TINY_TOWER, dataclasses.replace(TRAINING, validation_k=k), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / config_lib.CONFIG_FILE)


def test_validation_k_is_not_checked_without_validation():
  train_lib.check_validation_k(dataclasses.replace(TRAINING, validation_fraction=0.0, validation_k=100), 8)
  train_lib.check_validation_k(dataclasses.replace(TRAINING, validation_k=7), 8)
