"""fgr-eval's flags: a bad cut-off, --model_path or --report_file is refused in one line, before any run is read.

(Run as subprocesses: importing eval_cli would define its required flags in this process's FLAGS.)
"""

import os
import subprocess
import sys

import pytest

from export import report_file, version_report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fgr_eval(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "export.eval_cli", *flags],
    cwd=REPO_ROOT,
    env={**os.environ, "PYTHONPATH": REPO_ROOT},
    capture_output=True,
    text=True,
    check=False,
  )


@pytest.mark.parametrize(
  "ks, message",
  [("0", "--ks must all be at least 1"), ("10,-5", "--ks must all be at least 1"), ("ten", "--ks must be whole")],
)
def test_a_cut_off_below_one_is_a_usage_error(tmp_path, ks, message):
  # No run is there: the flag must be refused before fgr-eval looks for one.
  result = _fgr_eval(f"--output_dir={tmp_path}", f"--ks={ks}")
  assert result.returncode == 1 and message in result.stderr
  assert result.stdout == ""


def test_a_base_path_given_as_model_path_is_refused_naming_a_version_to_pass(tmp_path):
  for version in ("3", "12"):
    os.makedirs(tmp_path / version)
  result = _fgr_eval(f"--model_path={tmp_path}")
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


def test_a_report_file_in_a_missing_directory_is_refused_before_the_run_is_read(tmp_path):
  # No run is there either: the evaluation used to run whole, then fail writing, printing nothing.
  report = tmp_path / "reports" / "eval.json"
  result = _fgr_eval(f"--output_dir={tmp_path}", f"--report_file={report}")
  assert result.returncode == 1, result.stderr[-3000:]
  assert f"--report_file={report}: the directory {tmp_path / 'reports'} does not exist" in result.stderr
  with pytest.raises(ValueError, match="is a directory"):
    report_file.check(str(tmp_path))
  report_file.check(str(tmp_path / "eval.json"))


def test_the_report_is_printed_before_it_is_written_and_written_whole(tmp_path, capsys):
  report_file.publish('{"recall": 1}', str(tmp_path / "eval.json"))
  assert (tmp_path / "eval.json").read_text() == '{"recall": 1}\n' and os.listdir(tmp_path) == ["eval.json"]
  with pytest.raises(FileNotFoundError):
    report_file.publish('{"recall": 2}', str(tmp_path / "gone" / "eval.json"))  # The directory went away since.
  assert capsys.readouterr().out == '{"recall": 1}\n{"recall": 2}\n'
