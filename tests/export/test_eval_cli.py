"""fgr-eval's flags: a bad cut-off or --model_path is refused in one line, before any run is read."""

import os
import subprocess
import sys

import pytest

from export import version_report

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


def test_a_base_path_given_as_model_path_is_refused_naming_a_version_to_pass(tmp_path):
  for version in ("3", "12"):
    os.makedirs(tmp_path / version)
  result = subprocess.run(
    [sys.executable, "-m", "export.eval_cli", f"--model_path={tmp_path}"],
    cwd=REPO_ROOT,
    env={**os.environ, "PYTHONPATH": REPO_ROOT},
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 1 and "fgr-refresh needs" not in result.stderr
  assert (
    f"{tmp_path}/assets.extra/" in result.stderr
    and f"is missing: not a version written by fgr-export or fgr-refresh; {tmp_path} holds versions, so pass one, "
    f"e.g. {tmp_path / '12'}"
    in result.stderr
  )


def test_a_directory_without_versions_is_refused_without_a_hint(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"is missing: not a version written by fgr-export or fgr-refresh$"):
    version_report.read(str(tmp_path))
