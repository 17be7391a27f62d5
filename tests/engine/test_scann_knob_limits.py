"""ScaNN's per-request knobs: 0 is the built default, other values outside the built index's range are
refused by name; and a tree forced on a small catalog gets AH with reordering."""

import numpy as np
import pytest
import tensorflow as tf

from engine import scann_config, scann_index

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
