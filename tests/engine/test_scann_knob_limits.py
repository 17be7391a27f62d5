"""ScaNN's knobs: per request, 0 is the built default and other values outside the built index's range are
refused by name; at build, every knob out of range is refused by name before ScaNN trains; and a tree
forced on a small catalog gets AH with reordering."""

import numpy as np
import pytest
import tensorflow as tf

from engine import scann_backend, scann_config, scann_index

K = 5


@pytest.fixture(scope="module")
def items() -> np.ndarray:
  rng = np.random.default_rng(3)
  vectors = rng.normal(size=(600, 8)).astype(np.float32)
  return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _search_with(index):
  return tf.function(
    lambda q, leaves, reorder: index.search(q, K, leaves_to_search=leaves, pre_reorder_num_neighbors=reorder).indices
  )


def test_forced_tree_gets_ah_and_reordering(items):
  index = scann_index.build_scann(items, k=K, num_leaves=10, scoring="ah", leaves_to_search=3)
  assert index.config["reorder"] == scann_config.default_reorder("ah", 600, K) == 200
  assert scann_index.build_scann(items, k=K, num_leaves=10, leaves_to_search=3).config["reorder"] == 0


def test_tree_knob_ranges(items):
  index = scann_index.build_scann(items, k=K, num_leaves=10, scoring="ah", leaves_to_search=3)
  search = _search_with(index)
  queries = tf.constant(items[:2])
  for leaves, reorder in ((0, 0), (1, K), (10, 600)):
    assert np.all(search(queries, tf.constant(leaves), tf.constant(reorder)).numpy() >= 0)
  for leaves, reorder, named in (
    (-1, 0, "leaves_to_search"),
    (11, 0, "leaves_to_search"),
    (0, K - 1, "pre_reorder_num_neighbors"),
    (0, 601, "pre_reorder_num_neighbors"),
    (0, -(2**31), "pre_reorder_num_neighbors"),
  ):
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{named} must be .*got.*{reorder or leaves}"):
      search(queries, tf.constant(leaves), tf.constant(reorder))


def test_knobs_an_index_does_not_use_must_be_0(items):
  index = scann_index.build_scann(items, k=K)  # 600 items: brute force, no tree, no reordering.
  assert index.config["num_leaves"] == 0 and index.config["reorder"] == 0
  search = _search_with(index)
  queries = tf.constant(items[:2])
  assert np.all(search(queries, tf.constant(0), tf.constant(0)).numpy() >= 0)
  with pytest.raises(tf.errors.InvalidArgumentError, match="leaves_to_search must be 0: this ScaNN index has no tree"):
    search(queries, tf.constant(1), tf.constant(0))
  with pytest.raises(tf.errors.InvalidArgumentError, match="pre_reorder_num_neighbors must be 0: .* does not reorder"):
    search(queries, tf.constant(0), tf.constant(100))


@pytest.mark.parametrize(
  "options,named",
  [
    ({"overfetch": 0}, "overfetch must be an integer of at least 1, got 0"),
    ({"scoring": "ah", "dimensions_per_block": 0}, "dimensions_per_block must be an integer of at least 1, got 0"),
    ({"num_leaves": -3}, r"num_leaves must be 0 \(no tree\) or 1 to 600, the number of ads, got -3"),
    ({"num_leaves": 601}, "num_leaves must be .*1 to 600.*got 601"),
    ({"num_leaves": 2.5}, "num_leaves must be .*got 2.5"),
    ({"scoring": "ah", "training_sample_size": 0}, r"training_sample_size must be an integer of at least 64 \(AH"),
    (
      {"num_leaves": 40, "training_sample_size": 39},
      r"training_sample_size must be an integer of at least 40 \(the tree picks its 40 leaves' centres",
    ),
    ({"num_leaves": 40, "leaves_to_search": 100}, r"leaves_to_search must be 0 .*or 1 to num_leaves \(40\), got 100"),
    ({"leaves_to_search": 5}, r"leaves_to_search must be 0 without a tree \(num_leaves=0\), got 5"),
    ({"reorder": -5}, r"reorder must be 0 \(no reordering\) or at least k \(5\), got -5"),
    ({"reorder": 3}, r"reorder must be 0 \(no reordering\) or at least k \(5\), got 3"),
    ({"final_candidates": -1}, r"final_candidates must be 0 \(automatic\) or at least k \(5\), got -1"),
    ({"target_recall": 1.5}, r"target_recall must be a number in \[0, 1\], got 1.5"),
    ({"num_tuning_queries": 0}, "num_tuning_queries must be an integer of at least 1, got 0"),
    ({"training_threads": -1}, r"training_threads must be 0 \(all cores\) or positive, got -1"),
    ({"seed": -1}, "seed must be an integer of at least 0, got -1"),
    ({"anisotropic_quantization_threshold": float("inf")}, "anisotropic_quantization_threshold must be a finite"),
  ],
)
def test_build_knobs_out_of_range_are_refused_by_name(items, options, named):
  # Refused before ScaNN trains: these were tracebacks, a ZeroDivisionError, or an index whose every search failed.
  with pytest.raises(ValueError, match=named):
    scann_index.build_scann(items, k=K, **options)


def test_build_knobs_at_their_limits_build(items):
  search = tf.function(lambda index, q: index.search(q, K).indices)
  for options in (
    {"num_leaves": 600, "training_sample_size": 600, "leaves_to_search": 600},  # Every ad its own leaf.
    {"num_leaves": 1, "leaves_to_search": -1},  # -1: what a build without a tree records, tuned like 0.
    {"scoring": "ah", "training_sample_size": 64, "anisotropic_quantization_threshold": float("nan")},
    {"scoring": "ah", "dimensions_per_block": 1, "overfetch": 1},
  ):
    index = scann_index.build_scann(items, k=K, **options)
    assert np.all(search(index, tf.constant(items[:2])).numpy() >= 0), options


def test_a_rebuild_over_another_tree_tunes_its_search_knobs_anew(items):
  # fgr-refresh rebuilds with the version's tuned knobs (a refreshed version's options hold them too). 30
  # leaves to search of 30 would be out of range, and meaningless, for an override of 20 leaves.
  options = {"scoring": "ah", "num_leaves": 30, "leaves_to_search": 30, "reorder": 200}
  config = {"num_leaves": 30, "leaves_to_search": 30, "reorder": 200, "final_candidates": 10}
  rebuild = scann_backend.BACKEND.rebuild_options
  kept = rebuild(options, config, K, {"training_sample_size": 500})
  assert kept["leaves_to_search"] == 30 and kept["reorder"] == 200 and kept["training_sample_size"] == 500
  with pytest.raises(ValueError, match="leaves_to_search must be"):
    scann_index.build_scann(items, k=K, **{**kept, "num_leaves": 20})
  retuned = rebuild(options, config, K, {"num_leaves": 20})
  assert not {"leaves_to_search", "reorder", "final_candidates"} & set(retuned) and retuned["num_leaves"] == 20
  assert 1 <= scann_index.build_scann(items, k=K, **retuned).config["leaves_to_search"] <= 20
  assert rebuild(options, config, K, {"num_leaves": 20, "leaves_to_search": 4})["leaves_to_search"] == 4


def test_pre_reorder_answers_are_scanns_own(items):
  # With every ad eligible the graph returns exactly what ScaNN's op returns at each pre_reorder_num_neighbors
  # (audit 14, item 12: a recall dip measured at pre_reorder = k came from paused ads' exact fallback).
  from scann.scann_ops.py import scann_ops  # pylint: disable=g-import-not-at-top

  index = scann_index.build_scann(items, k=K, num_leaves=10, scoring="ah", leaves_to_search=10, reorder=40)
  queries = tf.constant(items[:32])
  search = _search_with(index)
  for pre in (K, 2 * K, 4 * K, 8 * K):
    ours = search(queries, tf.constant(0), tf.constant(pre)).numpy()
    theirs, _ = scann_ops.scann_search_batched(index.state.searcher(), queries, K, pre, 10, True)
    assert [set(row) for row in ours] == [set(row) for row in theirs.numpy()], pre
