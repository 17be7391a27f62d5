"""Every backend survives tf.saved_model.save/load; the partitioned one loads without ScaNN."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from engine import base, stock_ops
from tests import cli_testlib, topk_testlib

_OPTIONS = {
  "brute_force": {"jit_compile": True},
  "int8": {},
  "binary": {"learned": False, "rerank_candidates": 100},
  "partitioned": {"probes": 8},
}


def _export(index, dim: int, path: str) -> tf.Module:
  """A module with a `search` signature taking queries and the backend's search options."""
  module = tf.Module()
  module.index = index
  specs = index.search_option_specs()

  @tf.function
  def search(queries, **options):
    result = index.search(queries, 10, **options)
    return {"scores": result.scores, "indices": result.indices}

  signature = search.get_concrete_function(tf.TensorSpec([None, dim], tf.float32, name="queries"), **specs)
  tf.saved_model.save(
    module,
    path,
    signatures={"search": signature},
    options=tf.saved_model.SaveOptions(namespace_whitelist=index.save_namespaces() or None),
  )
  return module


@pytest.mark.parametrize("backend", sorted(_OPTIONS))
def test_round_trip(small_catalog, tmp_path, backend):
  items, queries = small_catalog
  index = base.build_index(backend, items, k=10, **_OPTIONS[backend])
  _export(index, items.shape[1], str(tmp_path))
  loaded = tf.saved_model.load(str(tmp_path)).signatures["search"]
  options = {name: tf.constant(0, spec.dtype) for name, spec in index.search_option_specs().items()}
  got = loaded(queries=tf.constant(queries), **options)
  expected = tf.function(lambda q: index.search(q, 10))(tf.constant(queries))
  # The loaded graph may round otherwise (other grappler rewrites; XLA for brute_force): the same
  # answers up to ties. Approximate backends may also pick another candidate where one rounding
  # difference moves a query across a partition or candidate boundary (2% of the 640 places).
  topk_testlib.assert_top_k_agree(
    got["indices"].numpy(),
    expected.indices.numpy(),
    topk_testlib.reference_scores(queries, items),
    max_unexplained=0 if backend == "brute_force" else 0.02,
  )
  same = got["indices"].numpy() == expected.indices.numpy()
  np.testing.assert_allclose(got["scores"].numpy()[same], expected.scores.numpy()[same], rtol=1e-5)


def test_partitioned_loads_in_stock_tensorflow_without_scann(small_catalog, tmp_path):
  items, _ = small_catalog
  index = base.build_index("partitioned", items, k=10, probes=8)
  _export(index, items.shape[1], str(tmp_path))
  report = stock_ops.load_in_fresh_process(str(tmp_path))
  assert report["loaded"] and report["ran"], report["error"]
  assert report["custom_ops"] == [] and not report["scann_imported"] and report["xla_functions"] == []


@pytest.mark.parametrize(
  "backend,options,needs_xla",
  [
    ("brute_force", {"jit_compile": True}, True),
    ("brute_force", {}, False),
    ("binary", {"learned": False, "rerank_candidates": 100, "jit_compile": True}, True),
    ("binary", {"learned": False, "rerank_candidates": 100}, False),  # The default loads in stock TF Serving.
    ("int8", {}, True),  # Its codes are scored under XLA by default (Int8Index).
    ("int8", {"jit_compile": False}, False),
  ],
)
def test_functions_that_must_be_xla_compiled_are_found(small_catalog, tmp_path, backend, options, needs_xla):
  # Stock TF Serving runs XLA on CPU only with --xla_cpu_compilation_enabled; reports name the need.
  items, _ = small_catalog
  _export(base.build_index(backend, items, k=10, **options), items.shape[1], str(tmp_path))
  assert bool(stock_ops.xla_compiled_functions(str(tmp_path))) == needs_xla


def test_check_catches_scann_custom_ops(small_catalog, tmp_path):
  items, _ = small_catalog
  index = base.build_index("scann", items, k=10, scoring="ah", reorder=50)
  _export(index, items.shape[1], str(tmp_path))
  report = stock_ops.load_in_fresh_process(str(tmp_path))
  assert "Scann>TensorsToScann" in report["custom_ops"] and not report["loaded"]


def _run_check(args: list[str]) -> subprocess.CompletedProcess:
  """`python -m engine.stock_ops ARGS` as README.md shows it, with none of TensorFlow's log settings."""
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLED_DEVICE_TYPES")}
  env["PYTHONPATH"] = cli_testlib.REPO_ROOT
  return subprocess.run(
    [sys.executable, "-m", "engine.stock_ops", *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    cwd=cli_testlib.REPO_ROOT,
  )


def test_the_documented_check_prints_its_report_without_tensorflow_s_start_up_lines(small_catalog, tmp_path):
  # It printed TF's CUDA, oneDNN and CPU-feature notices, and a cuInit ERROR, around its one JSON line.
  items, _ = small_catalog
  _export(base.build_index("partitioned", items, k=10, probes=8), items.shape[1], str(tmp_path))
  result = _run_check([str(tmp_path)])
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout)["ran"]
  assert not re.search(r"^\d{4}-\d\d-\d\d [\d:.]+: [IWEF] ", result.stderr, re.MULTILINE), result.stderr[-3000:]


@pytest.mark.parametrize(
  "args, message",
  [
    ([], "give one SavedModel directory: python -m engine.stock_ops VERSION_DIR"),
    (["/nonexistent/1"], "[Errno 2] No such file or directory: '/nonexistent/1/saved_model.pb'"),
  ],
)
def test_the_documented_check_reports_a_mistake_in_one_line(args, message):
  # Both ended in a traceback (IndexError, FileNotFoundError).
  result = _run_check(args)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-2:] == [
    f"python -m engine.stock_ops: error: {message}",
    "(python -m engine.stock_ops --verbosity=1 shows where it was raised)",
  ]
