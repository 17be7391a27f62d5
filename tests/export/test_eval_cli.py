"""fgr-eval's flags: a bad cut-off is a usage error before any run is read."""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
  "ks, message",
  [("0", "--ks must all be at least 1"), ("10,-5", "--ks must all be at least 1"), ("ten", "--ks must be whole")],
)
def test_a_cut_off_below_one_is_a_usage_error(tmp_path, ks, message):
  # No run is there: the flag must be refused before fgr-eval looks for one.
  result = subprocess.run(
    [sys.executable, "-m", "export.eval_cli", f"--output_dir={tmp_path}", f"--ks={ks}"],
    cwd=REPO_ROOT,
    env={**os.environ, "PYTHONPATH": REPO_ROOT},
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 1 and message in result.stderr
  assert result.stdout == ""
