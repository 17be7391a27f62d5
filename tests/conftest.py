"""Shared fixtures: a tiny synthetic training run and exports of it, each made once per test session
(once in all, not once per pytest-xdist worker: `_built_once`)."""

from __future__ import annotations

import fcntl
import gc
import json
import os
import shutil
from collections.abc import Callable, Mapping

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from export import exporter  # noqa: E402
from models import config as config_lib  # noqa: E402
from models import train as train_lib  # noqa: E402
from models.data import sources  # noqa: E402
from tests.serving import scann_testlib  # noqa: E402

MOVIELENS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "ml-100k")

TINY_TOWER = config_lib.TowerConfig(
  embedding_dim=16,
  output_dim=16,
  hidden_units=(32,),
  id_buckets=5000,
  token_buckets=2000,
  user_buckets=2000,
  side_buckets=500,
)
TINY_DATA = sources.DataSpec(
  name="synthetic", synthetic={"num_ads": 3000, "num_users": 300, "num_sessions": 4000, "seed": 7}
)
# One epoch, without the full-catalog top-k evaluation at the end: train() only returns its figures,
# and the tests that train a run to export or restore it do not read them.
TINY_TRAINING = train_lib.TrainConfig(epochs=1, batch_size=256, eval_max_items=0)
# Candidates per request of the shared `scann_export`.
SCANN_EXPORT_K = 20
# How the shared `brute_force_export` is made: exact search, so its recall check needs few queries.
BRUTE_FORCE_EXPORT = exporter.ExportConfig(
  index="brute_force", k=10, num_warmup_requests=5, eval_queries=50, tuning_queries=0
)


_frozen_before: list[str] = []  # The test file whose start last froze the GC's objects.


def _freeze_gc() -> None:
  """Collects, then moves every object still alive out of the GC's reach (`gc.freeze`).

  As fgr-serve does at start-up (`serving.util.runtime.freeze_gc`), and for the same reason: every full
  collection, automatic or the one an in-process server runs per unloaded version, would otherwise
  traverse them all again. Frozen objects are still freed when no reference is left; only a cycle
  among them that became garbage later would stay, and what is alive between test files (modules,
  session fixtures, TensorFlow's caches) lives until the session ends.
  """
  gc.collect()
  gc.freeze()


def pytest_collection_finish(session):
  del session
  _freeze_gc()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  """Freezes again at each test file's first test: the file before it has torn its fixtures down."""
  path = str(item.path)
  if _frozen_before[-1:] != [path]:
    _frozen_before[:] = [path]
    _freeze_gc()


def _built_once(tmp_path_factory, name: str, build: Callable[[str], str]) -> str:
  """`build(directory)`'s result, built once per test session, not once per pytest-xdist worker.

  The workers of one session share their base temp's parent: the first to ask builds there under an
  exclusive lock, and the others wait on it, then read the result it recorded. Only for artifacts that
  tests never change in place (as every session fixture below). Without xdist, a plain mktemp.
  """
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return build(str(tmp_path_factory.mktemp(name)))
  root = tmp_path_factory.getbasetemp().parent
  done = root / f"{name}.json"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes, or the process ends.
    if done.exists():
      return json.loads(done.read_text())
    directory = root / name
    if directory.exists():  # A build that failed (its worker then failed its tests): start over.
      shutil.rmtree(directory)
    directory.mkdir()
    result = build(str(directory))
    done.write_text(json.dumps(result))
    return result


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> str:
  """The output_dir of a one-epoch fgr-train run on a 3k-ad synthetic log."""

  def train(output_dir: str) -> str:
    train_lib.train(TINY_DATA, TINY_TOWER, TINY_TRAINING, output_dir)
    return output_dir

  return _built_once(tmp_path_factory, "train", train)


@pytest.fixture(scope="session")
def scann_export(trained_run, tmp_path_factory) -> str:
  """Version 1 of a ScaNN full-graph export (`SCANN_EXPORT_K`; exact at this catalog's size) of `trained_run`.

  One export for every test that serves, loads or refreshes "some ScaNN export" of the run: each
  export traces, saves and checks the whole graph anew. Versions are never modified in place, so tests
  link it into a base path of their own (`export.version_files.link_tree`) and publish there.
  """
  config = exporter.ExportConfig(index="scann", k=SCANN_EXPORT_K, eval_queries=20, num_warmup_requests=4)
  return _built_once(
    tmp_path_factory, "scann_export", lambda base_path: exporter.export_model(trained_run, base_path, config)["path"]
  )


@pytest.fixture(scope="session")
def brute_force_export(trained_run, tmp_path_factory) -> str:
  """Version 1 of a brute-force full-graph export (`BRUTE_FORCE_EXPORT`) of `trained_run`: its path.

  Shared as `scann_export` is: tests copy or link it, and never change it in place.
  """
  return _built_once(
    tmp_path_factory,
    "brute_force_export",
    lambda base_path: exporter.export_model(trained_run, base_path, BRUTE_FORCE_EXPORT)["path"],
  )


@pytest.fixture(scope="session")
def tree_export(trained_run, tmp_path_factory) -> str:
  """Version 1 of a tree-AH ScaNN export of `trained_run` (`scann_testlib.export_tree`): its path.

  A fixture rather than a cache in scann_testlib: test files import that module under two names
  (`scann_testlib`, `tests.serving.scann_testlib`), and each name would have had its own cache.
  """
  return _built_once(
    tmp_path_factory, "scann_tree", lambda base_path: scann_testlib.export_tree(trained_run, base_path)
  )


def find_movielens(path: str | None = None, environ: Mapping[str, str] | None = None) -> str:
  """The MovieLens-100K folder (default MOVIELENS_DIR); if it is missing, skips the test, or fails it in CI.

  A machine without the shared datasets folder still runs the rest of the suite, but CI (the
  environment has CI=true) must not pass by skipping every MovieLens test when the data goes missing.
  """
  path = MOVIELENS_DIR if path is None else path
  environ = os.environ if environ is None else environ
  if os.path.exists(os.path.join(path, "u.data")):
    return path
  message = f"MovieLens-100K not found at {os.path.abspath(path)} (the shared datasets folder)"
  if environ.get("CI", "").lower() == "true":
    pytest.fail(f"{message}; CI=true, so the data must be there", pytrace=False)
  pytest.skip(f"{message}; outside CI (CI=true) tests that need it are skipped")


@pytest.fixture(scope="session")
def movielens_dir() -> str:
  return find_movielens()


# fgr-serve's --native values the serving tests run under: the Python gRPC front end and the native
# data plane (serving/native). Test ids say which: test_x[python], test_x[native].
NATIVE_MODES = ("off", "on")
NATIVE_IDS = ("python", "native")


def require_native(environ: Mapping[str, str] | None = None) -> None:
  """Skips the test when the native data plane is not built, or fails it in CI (CI=true), as
  `find_movielens` does for its data: CI must not pass by skipping every native test."""
  from serving.model_servers import native_server  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

  module, reason = native_server.load_module()
  if module is not None:
    return
  environ = os.environ if environ is None else environ
  message = f"the native data plane is unavailable: {reason}"
  if environ.get("CI", "").lower() == "true":
    pytest.fail(f"{message}; CI=true, so it must be built (make install)", pytrace=False)
  pytest.skip(f"{message}; outside CI (CI=true) the native tests are skipped")


@pytest.fixture(scope="session", params=NATIVE_MODES, ids=NATIVE_IDS)
def native_mode(request) -> str:
  """fgr-serve's --native for a server-starting test: each such test runs once per mode."""
  if request.param == "on":
    require_native()
  return request.param
