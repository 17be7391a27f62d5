"""Benchmarks run as `python -m bench.<module>` report a user's mistake in one line, as the console scripts do."""

from __future__ import annotations

import glob
import os

from tests import cli_testlib


def test_a_missing_path_is_one_line_not_a_traceback(tmp_path):
  result = cli_testlib.run_module("bench.movielens_logs", ["--data_dir=/nonexistent", f"--output_dir={tmp_path}"])
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[-2] == (
    "python -m bench.movielens_logs: error: /nonexistent is not a MovieLens-100K directory: "
    "missing u.data, u.item, u.user"
  )
  assert lines[-1] == "(python -m bench.movielens_logs --verbosity=1 shows where it was raised)"


def test_every_absl_benchmark_runs_through_the_launcher():
  """`app.run(main)` in a module's `__main__` block showed a traceback for a bad flag value or path."""
  direct = []
  for path in sorted(glob.glob(os.path.join(cli_testlib.REPO_ROOT, "bench", "*.py"))):
    with open(path) as f:
      text = f.read()
    main_block = text.partition('\nif __name__ == "__main__":')[2]
    if "app.run(" in main_block or (main_block and "launch.run_module(" not in main_block and "argparse" not in text):
      direct.append(os.path.basename(path))
  assert direct == []
