"""Every backend survives tf.saved_model.save/load; the partitioned one loads without ScaNN."""

import numpy as np
import pytest
import tensorflow as tf

from engine import base, stock_ops
from tests import topk_testlib

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
