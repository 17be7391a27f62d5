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


def test_every_command_s_module_runs_through_the_launcher_too():
  """`python -m models.train_cli` (and the other commands' modules) showed a traceback for a mistake
  their console script reports in one line."""
  from cli import launch

  modules = [
    command.__doc__.split("`")[1].rsplit(".", 1)[0]
    for name, command in vars(launch).items()
    if name.startswith("fgr_") and command.__doc__ and name not in ("fgr_serve", "fgr_bench")  # bench: above.
  ]
  assert "models.train_cli" in modules and "export.refresh_cli" in modules
  direct = []
  for module in modules:
    with open(os.path.join(cli_testlib.REPO_ROOT, *module.split(".")) + ".py") as f:
      main_block = f.read().partition('\nif __name__ == "__main__":')[2]
    if "launch.run_module(main)" not in main_block:
      direct.append(module)
  assert direct == []
  result = cli_testlib.run_module(
    "models.data.prepare_cli", ["--data=logs", "--data_dir=/nonexistent", "--output_dir=x"]
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-2] == (
    "python -m models.data.prepare_cli: error: /nonexistent/items.jsonl is missing; see docs/data_format.md"
  )


def test_a_usage_error_of_a_module_is_one_line_without_the_flag_listing():
  """absl printed it under the module's docstring and every flag it defines (some 85 lines)."""
  result = cli_testlib.run_module("export.export_cli", ["--checkpoint_dir=x", "--model_base_path=y", "--k=0"])
  assert result.returncode == 1 and "Traceback" not in result.stderr
  lines = [line for line in result.stderr.strip().splitlines() if not line.startswith(("20", "To enable", "WARNING"))]
  assert lines == [
    "python -m export.export_cli: error: k must be at least 1 (the candidates returned per request), got 0",
    "(python -m export.export_cli --verbosity=1 shows where it was raised)",
  ], result.stderr[-3000:]
