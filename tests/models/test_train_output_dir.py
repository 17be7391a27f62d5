"""An --output_dir fgr-train cannot write is refused in one line before any data is read."""

import pytest

from models import config as config_lib
from models import train as train_lib
from models.data import sources
from tests.conftest import TINY_TOWER


def test_an_output_dir_that_cannot_be_created_is_refused_before_the_data(tmp_path):
  (tmp_path / "a_file").write_text("")
  run_dir = str(tmp_path / "a_file" / "run")
  # Missing data: had the data been opened first, this would be the error.
  data = sources.DataSpec(name="logs", data_dir=str(tmp_path / "no_data"))
  with pytest.raises(ValueError, match=r"^--output_dir .*/a_file/run cannot be written: .*a_file is not a directory$"):
    train_lib.train(data, TINY_TOWER, train_lib.TrainConfig(epochs=1, batch_size=8), run_dir)


def test_a_writable_output_dir_is_created_empty(tmp_path):
  config_lib.check_writable(str(tmp_path / "new" / "run"))
  assert list((tmp_path / "new" / "run").iterdir()) == []
