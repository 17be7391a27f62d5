"""fgr-eval's flags: a bad cut-off, --model_path or --report_file is refused in one line, before any run is read.

(Run in a subprocess: importing eval_cli would define its required flags in this process's FLAGS. One
subprocess for every command line: each start imports TensorFlow anew, which costs seconds of CPU.)
"""

import json
import os
import subprocess
import sys

import pytest

from export import report_file, version_report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Each command line as `python -m export.eval_cli` runs it: its flags parsed afresh, then main; a usage
# error or an exception ends it with status 1 and its message on stderr. Prints [status, stdout, stderr].
_RUN_COMMAND_LINES = """
import contextlib, io, json, sys, traceback
from absl import app
from export import eval_cli
for argv in json.loads(sys.argv[1]):
  eval_cli.FLAGS.unparse_flags()
  stdout, stderr, status = io.StringIO(), io.StringIO(), 0
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    try:
      eval_cli.FLAGS(["fgr-eval", *argv])
      eval_cli.main(["fgr-eval"])
    except app.UsageError as e:
      sys.stderr.write(f"{e}\\n")  # What app.run prints after the usage.
      status = 1
    except Exception:
      traceback.print_exc()
      status = 1
  print(json.dumps([status, stdout.getvalue(), stderr.getvalue()]))
"""


KS_CASES = {"0": "--ks must all be at least 1", "10,-5": "--ks must all be at least 1", "ten": "--ks must be whole"}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[str, subprocess.CompletedProcess]]:
  """What fgr-eval does with each test's command line, by name: (the test's directory, its result).

  Each directory is empty but for what its test put there: no run is in any of them.
  """
  directories = {name: str(tmp_path_factory.mktemp(name)) for name in ["base_path", "report_file", *KS_CASES]}
  for version in ("3", "12"):
    os.makedirs(os.path.join(directories["base_path"], version))
  commands = {ks: [f"--output_dir={directories[ks]}", f"--ks={ks}"] for ks in KS_CASES}
  commands["base_path"] = [f"--model_path={directories['base_path']}"]
  report = os.path.join(directories["report_file"], "reports", "eval.json")
  commands["report_file"] = [f"--output_dir={directories['report_file']}", f"--report_file={report}"]
  result = subprocess.run(
    [sys.executable, "-c", _RUN_COMMAND_LINES, json.dumps(list(commands.values()))],
    cwd=REPO_ROOT,
    env={**os.environ, "PYTHONPATH": REPO_ROOT},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
  assert len(lines) == len(commands), result.stdout
  return {
    name: (directories[name], subprocess.CompletedProcess(argv, *line))
    for (name, argv), line in zip(commands.items(), lines)
  }


@pytest.mark.parametrize("ks", list(KS_CASES))
def test_a_cut_off_below_one_is_a_usage_error(outcomes, ks):
  # No run is there: the flag must be refused before fgr-eval looks for one.
  _, result = outcomes[ks]
  assert result.returncode == 1 and KS_CASES[ks] in result.stderr
  assert result.stdout == ""


def test_a_base_path_given_as_model_path_is_refused_naming_a_version_to_pass(outcomes):
  base_path, result = outcomes["base_path"]
  assert result.returncode == 1 and "fgr-refresh needs" not in result.stderr
  assert (
    f"{base_path}/assets.extra/" in result.stderr
    and f"is missing: not a version written by fgr-export or fgr-refresh; {base_path} holds versions, so pass one, "
    f"e.g. {os.path.join(base_path, '12')}"
    in result.stderr
  )


def test_a_directory_without_versions_is_refused_without_a_hint(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"is missing: not a version written by fgr-export or fgr-refresh$"):
    version_report.read(str(tmp_path))


def test_a_report_file_in_a_missing_directory_is_refused_before_the_run_is_read(outcomes, tmp_path):
  # No run is there either: the evaluation used to run whole, then fail writing, printing nothing.
  directory, result = outcomes["report_file"]
  report = os.path.join(directory, "reports", "eval.json")
  assert result.returncode == 1, result.stderr[-3000:]
  assert f"--report_file={report}: the directory {os.path.join(directory, 'reports')} does not exist" in result.stderr
  with pytest.raises(ValueError, match="is a directory"):
    report_file.check(str(tmp_path))
  report_file.check(str(tmp_path / "eval.json"))


def test_the_report_is_printed_before_it_is_written_and_written_whole(tmp_path, capsys):
  report_file.publish('{"recall": 1}', str(tmp_path / "eval.json"))
  assert (tmp_path / "eval.json").read_text() == '{"recall": 1}\n' and os.listdir(tmp_path) == ["eval.json"]
  with pytest.raises(FileNotFoundError):
    report_file.publish('{"recall": 2}', str(tmp_path / "gone" / "eval.json"))  # The directory went away since.
  assert capsys.readouterr().out == '{"recall": 1}\n{"recall": 2}\n'
