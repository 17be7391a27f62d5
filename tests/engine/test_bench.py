"""fgr-bench end to end on a tiny catalog, its served (C API and Python session) search paths, and the section;
the percentiles every benchmark reports."""

import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from bench import capi_session, index_bench, report, served_index
from bench.fixtures import latency
from engine import base
from tests import topk_testlib


def test_replace_section_keeps_other_sections():
  document = "# Benchmarks\n\n## Training\n\nfast\n\n## Index backends\n\nold\n\n## Serving\n\nslow\n"
  updated = report.replace_section(document, "## Index backends\n\nnew\n")
  assert updated == "# Benchmarks\n\n## Training\n\nfast\n\n## Index backends\n\nnew\n\n## Serving\n\nslow\n"
  assert report.replace_section("", "## Index backends\n\nx\n") == "# Benchmarks\n\n## Index backends\n\nx\n"
  appended = report.replace_section("# Benchmarks\n\n## Training\n\nfast\n", "## Index backends\n\nx\n")
  assert appended.endswith("fast\n\n## Index backends\n\nx\n")


def test_bench_writes_report_plot_and_section(tmp_path):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["fgr-bench"])
  with open(tmp_path / "benchmarks.md", "w") as f:
    f.write("# Benchmarks\n\n## Serving\n\nkeep me\n")
  with flagsaver.flagsaver(
    num_items=3000,
    dim=16,
    k=10,
    num_queries=64,
    num_tuning_queries=32,
    num_single=8,
    num_single_sweep=4,
    batch_size=16,
    backends=["brute_force", "partitioned", "int8"],
    extras=[],
    sweep=True,
    out_dir=str(tmp_path),
  ):
    index_bench._main([])  # pylint: disable=protected-access
  section = (tmp_path / "benchmarks.md").read_text()
  assert "keep me" in section and "## Index backends" in section and "| partitioned | yes |" in section
  assert "loads and runs in a fresh process without ScaNN" in section
  assert os.path.getsize(tmp_path / report.PLOT_NAME) > 10_000
  assert "probes=" in (tmp_path / report.REPORT_NAME).read_text()


def test_served_index_matches_eager_search(small_catalog, tmp_path):
  items, queries = small_catalog
  index = base.build_index("partitioned", items, k=10, num_partitions=20, probes=3)
  served = served_index.ServedIndex(
    index, 10, str(tmp_path), index_bench.session_config(index_bench.CALLER_THREAD_CONFIG)
  )
  assert not os.listdir(tmp_path)  # The SavedModel is deleted once loaded.
  eager = tf.function(lambda q, p: index.search(q, 10, probes=p).indices)
  # A TF1 session over the loaded graph and TF2's function runtime may round otherwise: the same answers
  # up to ties; with 3 of 20 partitions probed, a rounding difference may also move a query across a
  # partition boundary (2% of the 640 places). With all 20 probed the search is exact.
  scores = topk_testlib.reference_scores(queries, items)
  topk_testlib.assert_top_k_agree(
    served.searcher()(queries), eager(tf.constant(queries), tf.constant(0)).numpy(), scores, max_unexplained=0.02
  )
  topk_testlib.assert_top_k_agree(
    served.searcher(probes=20)(queries[:1]), eager(tf.constant(queries[:1]), tf.constant(20)).numpy(), scores[:1]
  )
  with pytest.raises(ValueError, match="probes"):
    served.searcher(leaves_to_search=3)
  python = served_index.ServedIndex(index, 10, str(tmp_path), runner="python")
  topk_testlib.assert_top_k_agree(
    python.searcher(probes=20)(queries[:2]), served.searcher(probes=20)(queries[:2]), scores[:2]
  )


def test_capi_session_reports_errors(tmp_path):
  module = tf.Module()
  module.f = tf.function(lambda x: {"y": tf.reshape(x, [2, -1])}, input_signature=[tf.TensorSpec([None], tf.float32)])
  tf.saved_model.save(module, str(tmp_path), signatures={"f": module.f.get_concrete_function()})
  session = capi_session.CApiSession(str(tmp_path))
  call = session.signature("f", ["x"], "y")
  np.testing.assert_array_equal(call(np.arange(4, dtype=np.float32)), [[0, 1], [2, 3]])
  with pytest.raises(RuntimeError, match="reshape"):
    call(np.arange(3, dtype=np.float32))  # A failing run raises TensorFlow's message, and the session lives on.
  np.testing.assert_array_equal(call(np.zeros(2, np.float32)), [[0], [0]])
  with pytest.raises(ValueError, match="has no"):
    session.signature("f", ["z"], "y")
  with pytest.raises(RuntimeError):
    capi_session.CApiSession(str(tmp_path / "missing"))


def test_capi_session_refuses_string_tensors(tmp_path):
  module = tf.Module()
  module.f = tf.function(lambda x: {"y": tf.strings.length(x)}, input_signature=[tf.TensorSpec([None], tf.string)])
  tf.saved_model.save(module, str(tmp_path), signatures={"f": module.f.get_concrete_function()})
  with pytest.raises(ValueError, match="supported"):
    capi_session.CApiSession(str(tmp_path)).signature("f", ["x"], "y")


def test_percentiles_name_their_points_and_skip_unanswered_requests():
  seconds = np.random.default_rng(0).lognormal(mean=-6.0, sigma=1.0, size=5_000)
  with_failures = np.concatenate([seconds, [np.nan] * 100])  # NaN: a request without an answer.
  reported = latency.percentiles(with_failures, (50, 99, 99.9))
  assert list(reported) == ["p50_ms", "p99_ms", "p99.9_ms"]
  for point, key in ((50, "p50_ms"), (99, "p99_ms")):
    assert reported[key] == pytest.approx(1e3 * np.percentile(seconds, point), rel=0.01)
  assert latency.percentiles(seconds, (99,), suffix="") == {"p99": reported["p99_ms"]}
  assert latency.percentiles([np.nan]) == {}
