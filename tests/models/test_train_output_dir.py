"""An --output_dir fgr-train cannot write is refused in one line before any data is read, and a refused
run leaves no empty --output_dir of its own behind."""

import subprocess
import sys

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


def test_a_run_refused_after_its_output_dir_was_made_leaves_no_directory(tmp_path):
  """Too few examples for a batch is found after --output_dir is created (it is checked first, to fail
  fast); fgr-train then removes the directory it made, empty, rather than leave it behind."""
  run_dir = tmp_path / "runs" / "new"
  completed = subprocess.run(
    [
      sys.executable,
      "-m",
      "models.train_cli",
      f"--output_dir={run_dir}",
      "--num_ads=1000",
      "--num_sessions=20",
      "--batch_size=100000",
      "--epochs=1",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert completed.returncode == 1 and "lower --batch_size" in completed.stderr, completed.stderr[-2000:]
  assert not (tmp_path / "runs").exists()  # Both directories the run made go.


def test_a_refused_run_keeps_an_output_dir_that_was_there(tmp_path):
  existing = tmp_path / "mine"
  existing.mkdir()
  completed = subprocess.run(
    [sys.executable, "-m", "models.train_cli", f"--output_dir={existing}", "--num_sessions=20", "--batch_size=100000"],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert completed.returncode == 1 and existing.is_dir()
