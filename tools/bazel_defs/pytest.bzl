"""pytest_test_suite: one Bazel py_test per pytest file, found by glob.

The test suite is plain pytest (`make test` runs it as one pytest session). Under Bazel each
`test_*.py` file becomes its own py_test running pytest on that one file, so Bazel caches and
reports per file, and a test file added by anyone is picked up with no BUILD edit.
"""

_RUNNER = "//tools/bazel_defs:pytest_runner.py"

def pytest_test_suite(name, srcs, deps = [], data = [], size = "large", tags = [], **kwargs):
    """Declares `<file without .py>` py_tests for each file in srcs, plus a test_suite `name`.

    Args:
      name: name of the test_suite that holds every generated test.
      srcs: the pytest files, usually `glob(["**/test_*.py"])`.
      deps: py_library targets the tests import: the code under test and the shared fixtures
        (conftest.py files and test helpers), which must be in the runfiles for pytest to find.
      data: extra runtime files.
      size: Bazel test size; sets the timeout (large = 900 s: the machine's 2 cores are shared).
      tags: extra tags. Every test gets "requires-network", see below.
      **kwargs: passed to every py_test (e.g. `timeout`). Sharding is not supported: each file
        runs as one pytest session.
    """
    tests = []
    for src in srcs:
        test_name = src[:-len(".py")]
        native.py_test(
            name = test_name,
            srcs = [_RUNNER, src],
            main = _RUNNER,
            args = ["$(rootpath %s)" % src],
            python_version = "PY3",
            # Keep the runfiles tree exactly like the source tree: Bazel's default adds
            # __init__.py files to every directory, which turns tests/ into a package and
            # changes how pytest names and imports conftest.py and serving_testlib.
            legacy_create_init = 0,
            deps = deps,
            data = data + [
                # The venv's `pip freeze`: a changed environment invalidates cached results.
                "@python_venv//:installed_packages.txt",
            ],
            size = size,
            # Tests start fgr-serve subprocesses and talk to them on 127.0.0.1. The tag keeps
            # the sandbox from giving the test a separate network namespace even when someone
            # builds with --nosandbox_default_allow_network. Nothing reaches beyond loopback.
            tags = tags + ["requires-network"],
            **kwargs
        )
        tests.append(":" + test_name)
    native.test_suite(name = name, tests = tests)
