"""A console script's `--help` describes its command; a usage error stays short; ctrl-C ends it in one line."""

from __future__ import annotations

import sys
import types

import pytest
from absl import flags

from cli import launch
from tests import cli_testlib


@pytest.mark.parametrize(
  "argv, asked",
  [
    (["fgr-eval", "--help"], True),
    (["fgr-eval", "-help"], True),
    (["fgr-eval", "-?"], True),
    (["fgr-eval", "--helpshort"], True),
    (["fgr-eval", "--help=true"], True),
    (["fgr-eval", "--helpfull"], False),  # Lists every module's flags already.
    (["fgr-eval", "--ks=0"], False),
    (["fgr-eval", "help"], False),
    (["--help"], False),  # argv[0] is the program.
  ],
)
def test_help_is_recognised_as_absl_spells_it(argv, asked):
  assert launch.asks_for_help(argv) == asked


@pytest.fixture
def fake_command(monkeypatch):
  """A command module with one flag, a console-script wrapper as __main__, and flags of their own."""
  values = flags.FlagValues()
  monkeypatch.setattr(flags, "FLAGS", values)
  command = types.ModuleType("fake_tools.fake_cli", "fake-cli: judges nothing, for the test.")
  flags.DEFINE_string("cut_off", "10", "How far to judge.", flag_values=values, module_name=command.__name__)
  monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # The wrapper: no docstring.
  return values, command


def test_help_of_a_console_script_lists_its_commands_flags(monkeypatch, fake_command):
  """absl's --help lists the flags of the module named argv[0]: for a console script, the wrapper's,
  which has none, so every fgr-* --help printed only "USAGE: fgr-eval [flags]"."""
  values, command = fake_command
  monkeypatch.setattr(sys, "argv", ["/venv/bin/fake-cli", "--help"])
  assert "--cut_off" not in values.main_module_help()
  launch.list_flags_in_help(command)
  assert "--cut_off" in values.main_module_help()
  assert sys.modules["__main__"].__doc__ == command.__doc__


def test_a_usage_error_does_not_print_every_flag(monkeypatch, fake_command):
  # absl prints the main module's help above a usage error: without --help it stays the one line.
  values, command = fake_command
  monkeypatch.setattr(sys, "argv", ["/venv/bin/fake-cli", "--cut_off=x"])
  launch.list_flags_in_help(command)
  assert "--cut_off" not in values.main_module_help()
  assert sys.modules["__main__"].__doc__ is None


def test_ctrl_c_ends_a_tool_in_one_line_with_status_130(capsys):
  def interrupted():
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as info:
    launch._ending_quietly_on_ctrl_c(interrupted, ["/venv/bin/fgr-eval", "--output_dir=runs/x"])
  assert info.value.code == 130
  assert capsys.readouterr().err.strip() == "fgr-eval: interrupted"
  with pytest.raises(KeyboardInterrupt):  # Debugging: the traceback, as before.
    launch._ending_quietly_on_ctrl_c(interrupted, ["fgr-eval", "--verbosity=1"])


def test_fgr_eval_help_lists_its_flags():
  argv = ["/venv/bin/fgr-eval", "--help"]
  result = cli_testlib.run_console_script(argv)
  for flag in ("--model_path", "--output_dir", "--ks", "--max_examples", "--report_file"):
    assert flag in result.stdout, result.stdout + result.stderr[-2000:]
  assert "judges a training run" in result.stdout
