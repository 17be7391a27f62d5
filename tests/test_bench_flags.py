"""Benchmarks check their output files and flags before measuring: a failure after minutes lost the results."""

from __future__ import annotations

import os

import pytest

from export import report_file
from tests import cli_testlib


def test_a_benchmarks_report_directory_is_made(tmp_path):
  """model_speed ended in FileNotFoundError after measuring, without printing what it measured."""
  path = tmp_path / "bench_output" / "model_speed" / "results.json"
  report_file.check(str(path), make_directory=True)
  assert path.parent.is_dir() and not path.exists()
  with pytest.raises(FileNotFoundError, match="does not exist"):  # fgr-eval's --report_file: not made.
    report_file.check(str(tmp_path / "other" / "report.json"))


def test_a_directory_given_as_report_file_is_refused(tmp_path):
  with pytest.raises(ValueError, match="is a directory; name a file"):
    report_file.check(str(tmp_path), make_directory=True)


def test_index_bench_refuses_fewer_queries_than_a_batch_before_measuring(tmp_path):
  """Batched QPS had no whole batch to time: the first backend ended in an IndexError traceback."""
  result = cli_testlib.run_module("bench.index_bench", ["--num_queries=10", "--batch_size=64", f"--out_dir={tmp_path}"])
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-2] == (
    "python -m bench.index_bench: error: --num_queries (10) must be at least --batch_size (64)"
  )
  assert os.listdir(tmp_path) == []
