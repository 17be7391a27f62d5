"""Index option values are checked before the work they would waste: fgr-export's before the catalog is
embedded, and an incremental fgr-refresh's overrides (which no build checks) before a version is published."""

import os

import numpy as np
import pytest

from engine import base
from export import exporter, refresh, refresh_delta, refresh_policy, version_files, version_report, versions
from models import catalog as catalog_lib
from tests.serving import scann_testlib


@pytest.mark.parametrize(
  "index,options,message",
  [
    ("scann", {"num_leaves": 5000}, r"num_leaves must be 0 \(no tree\) or 1 to 3000, the number of ads, got 5000"),
    ("scann", {"target_recall": 2}, r"target_recall must be a number in \[0, 1\], got 2"),
    (
      "scann",
      {"num_leaves": 10, "leaves_to_search": 50},
      r"leaves_to_search must be .* 1 to num_leaves \(10\), got 50",
    ),
    ("partitioned", {"num_partitions": 5000}, r"num_partitions must be 0 \(about sqrt\(N\)\) or 1 to 3000, .*got 5000"),
    ("int8", {"target_recall": 2}, r"target_recall must be a number in \[0, 1\], got 2"),
    ("binary", {"bits": 100}, r"bits must be a positive multiple of 64, got 100"),
    ("brute_force", {"jit_compile": "yes"}, r"brute_force option jit_compile must be true or false, got 'yes'"),
    ("binary", {"learned": 2}, r"binary option learned must be true or false, got 2"),
    # numpy's "expected non-negative integer", after the catalog was embedded; int8 recorded 'abc'.
    ("binary", {"seed": -3}, r"seed must be .*got -3"),
    ("partitioned", {"seed": -3}, r"seed must be .*got -3"),
    ("int8", {"seed": "abc"}, r"seed must be .*got 'abc'"),
  ],
)
def test_export_refuses_index_option_values_before_embedding_the_catalog(
  trained_run, monkeypatch, index, options, message
):
  def embed_catalog(*args, **kwargs):
    raise AssertionError("the catalog was embedded before the options were checked")

  monkeypatch.setattr(catalog_lib, "embed_catalog", embed_catalog)
  with pytest.raises(ValueError, match=f"^{message}$"):
    exporter.build_graph(trained_run, exporter.ExportConfig(index=index, k=10, index_options=options))


@pytest.mark.parametrize("backend", ["brute_force", "int8", "binary"])
@pytest.mark.parametrize("value", ["false", "true", "False"])
def test_on_off_options_mean_what_they_say(backend, value):
  # `jit_compile=false` was parsed to the string "false", which is truthy: it turned XLA on. A version
  # report written then still holds the string, so the build reads it as the bool it names.
  items = np.random.default_rng(0).normal(size=[300, 16]).astype(np.float32)
  parsed = exporter.parse_index_options([f"jit_compile={value}"])
  assert parsed == {"jit_compile": value.lower() == "true"}
  extra = {"learned": False, "rerank_candidates": 100} if backend == "binary" else {}
  for options in (parsed, {"jit_compile": value}):  # From the flag, and from an older version's report.
    index = base.build_index(backend, items, k=10, **extra, **options)
    assert index._jit_compile is (value.lower() == "true")
  # What absl takes for a boolean flag: `jit_compile=0` parses to the integer 0.
  assert base.build_index(backend, items, k=10, **extra, jit_compile=0)._jit_compile is False


@pytest.mark.parametrize(
  "index,options,needs_xla,jit_compile",
  [
    ("int8", {}, False, False),  # Exported before int8 scored under XLA by default: rebuilt as it was.
    ("int8", {}, True, None),  # The default, which the source's graph already needed XLA for.
    ("int8", {}, None, None),  # A report that does not say.
    ("int8", {"jit_compile": False}, False, False),
    ("brute_force", {}, False, False),
    ("scann", {}, False, None),  # No such switch.
  ],
)
def test_a_refresh_adds_no_xla_its_source_did_without(index, options, needs_xla, jit_compile):
  report = version_report.VersionReport(
    version=1, path="", index=index, k=10, needs_xla=needs_xla, index_options=options
  )
  assert refresh_policy.rebuild_options(report).get("jit_compile") == jit_compile


def test_partitioned_values_are_judged_with_the_builders_defaults():
  partitioned = base.backend("partitioned")
  partitioned.check_values({"num_partitions": 30, "probes": 30}, 10, 3000)
  with pytest.raises(ValueError, match=r"^probes must be .*at most num_partitions \(30\), got 31$"):
    partitioned.check_values({"num_partitions": 30, "probes": 31}, 10, 3000)
  with pytest.raises(ValueError, match=r"^training_sample_size must be at least num_partitions \(55\)"):
    partitioned.check_values({"training_sample_size": 20}, 10, 3000)  # sqrt(3000) partitions by default.


def test_check_values_knows_the_catalog_size_and_k():
  scann = base.backend("scann")
  scann.check_values({"num_leaves": 30, "leaves_to_search": 6}, 10, 3000)
  with pytest.raises(ValueError, match=r"^reorder must be 0 \(no reordering\) or at least k \(10\), got 5$"):
    scann.check_values({"reorder": 5}, 10, 3000)


@pytest.mark.parametrize(
  "override,message",
  [
    ({"leaves_to_search": scann_testlib.NUM_LEAVES + 1}, r"leaves_to_search must be .* 1 to num_leaves \(30\), got 31"),
    ({"reorder": scann_testlib.K - 1}, r"reorder must be 0 \(no reordering\) or at least k \(10\), got 9"),
    ({"overfetch": 0}, r"overfetch must be an integer of at least 1, got 0"),
  ],
)
def test_an_incremental_refresh_refuses_search_knob_overrides_out_of_range(tree_export, tmp_path, override, message):
  base_path = str(tmp_path / "models")
  version_files.link_tree(tree_export, os.path.join(base_path, "1"))
  delta = refresh_delta.parse_lines(['{"ad_id": "new-1", "category": "c1", "brand": "b1", "tokens": ["t1"]}'], "d")
  refresher = refresh.Refresher(base_path, keep_versions=None, verify_recall=False, index_overrides=override)
  with pytest.raises(ValueError, match=f"^{message}$"):
    refresher.apply(delta)
  assert versions.list_versions(base_path) == [1]
