"""fgr-export checks --model_base_path before it builds: a build takes minutes, and it failed at the publish."""

from __future__ import annotations

import pytest

from export import versions
from tests import cli_testlib


def test_a_new_or_existing_directory_is_a_base_path(tmp_path):
  versions.check_base_path(str(tmp_path))
  versions.check_base_path(str(tmp_path / "models" / "ads"))  # publish makes it, parents too.


def test_a_file_is_no_base_path(tmp_path):
  (tmp_path / "ads").write_text("")
  with pytest.raises(NotADirectoryError, match=r"^The model base path \S+/ads is a file: versions are published"):
    versions.check_base_path(str(tmp_path / "ads"))
  with pytest.raises(NotADirectoryError, match=r"^The model base path \S+/ads/v/m can't be made: \S+/ads is a file$"):
    versions.check_base_path(str(tmp_path / "ads" / "v" / "m"))


def test_fgr_export_refuses_a_file_as_base_path_before_reading_the_run(tmp_path):
  """It built and verified the whole graph, then ended with "[Errno 17] File exists: '<base path>'"."""
  (tmp_path / "ads").write_text("")
  argv = ["fgr-export", f"--checkpoint_dir={tmp_path / 'no-run'}", f"--model_base_path={tmp_path / 'ads'}"]
  result = cli_testlib.run_console_script(argv)
  assert result.returncode == 1, result.stderr[-3000:]
  assert f"fgr-export: error: The model base path {tmp_path / 'ads'} is a file" in result.stderr, result.stderr[-3000:]
