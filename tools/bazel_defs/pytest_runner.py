"""Runs one pytest file as a Bazel test: the main of every py_test made by pytest_test_suite.

Bazel starts this in the runfiles copy of the workspace with the file's path as the argument.
It runs pytest the way `make test` does, adapted to Bazel's test protocol: results go to
XML_OUTPUT_FILE, `--test_filter` becomes `-k`, and nothing is written into the runfiles.
"""

import os
import shutil
import sys
import tempfile


def _forget_editable_install() -> None:
  """Imports the project only from the runfiles tree, never from the source checkout.

  `make install` installs the project editable, and its import hook finds any module of
  engine/models/export/serving in the source tree. Under Bazel that would hide a module missing
  from a py_library and read files Bazel does not track, so the hook is removed here.
  """
  sys.meta_path[:] = [
    finder for finder in sys.meta_path if not getattr(finder, "__module__", "").startswith("__editable__")
  ]


def main() -> int:
  if len(sys.argv) != 2:
    sys.exit("usage: pytest_runner.py TEST_FILE (run through `bazel test`)")
  _forget_editable_install()
  import pytest  # pylint: disable=g-import-not-at-top

  workspace = os.getcwd()
  # Hypothesis keeps its example database in ./.hypothesis by default: keep the runfiles clean.
  os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(os.environ.get("TEST_TMPDIR", tempfile.gettempdir()), "hypothesis")
  )
  # pytest's tmp_path directories go under a short, private /tmp directory, as with `make test`,
  # not under TEST_TMPDIR: that path is already ~100 characters, and tests bind Unix sockets in
  # tmp_path, whose paths are limited to 107 bytes. Bazel's sandbox leaves /tmp writable.
  basetemp = tempfile.mkdtemp(prefix="fgr-pytest-")
  args = [
    sys.argv[1],
    f"--rootdir={workspace}",
    f"--basetemp={basetemp}",
    "-p",
    "no:cacheprovider",  # .pytest_cache would be written into the runfiles.
    "-ra",  # Say why tests were skipped (e.g. no MovieLens data) in the test log.
  ]
  if os.environ.get("XML_OUTPUT_FILE"):
    args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
  if os.environ.get("TESTBRIDGE_TEST_ONLY"):
    args += ["-k", os.environ["TESTBRIDGE_TEST_ONLY"]]
  try:
    return pytest.main(args)
  finally:
    shutil.rmtree(basetemp, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
