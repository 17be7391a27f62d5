"""ScaNN backend: recall against NumPy, eligibility, per-request knobs and a SavedModel round trip."""

import types

import numpy as np
import pytest
import tensorflow as tf

from engine import base, scann_index, search_ops
from tests import topk_testlib


def _search(index, queries, k, **options):
  fn = tf.function(lambda q: index.search(q, k, **options))
  return fn(tf.constant(queries))


def _medium_index(items, tuning_queries, **options):
  """ScaNN over the medium catalog as these tests build it: k=20, 100 leaves, tuned on held-out queries."""
  return base.build_index(
    "scann", items, k=20, num_leaves=100, training_sample_size=20000, tuning_queries=tuning_queries, **options
  )


def test_recall_brute_force_config(small_catalog):
  items, queries = small_catalog
  index = base.build_index("scann", items, k=10)
  assert index.config["scoring"] == "brute_force"
  result = _search(index, queries, 10)
  truth = search_ops.exact_top_k_numpy(queries, items, 10)
  assert search_ops.recall_at_k(result.indices.numpy(), truth) >= 0.99
  np.testing.assert_allclose(result.scores.numpy()[:, 0], np.max(queries @ items.T, axis=1), rtol=1e-4)


def test_a_k_above_the_catalog_size_is_refused_at_build_as_full_graph_refuses_it():
  items = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
  with pytest.raises(ValueError, match=r"^k must be in \[1, 300\] \(the catalog size\), got 1000$"):
    base.build_index("scann", items, k=1000)
  with pytest.raises(ValueError, match=r"^k must be in \[1, 300\] \(the catalog size\), got 1000$"):
    base.check_k(1000, 300)  # What engine.full_graph says over a brute_force index.


def test_recall_tree_ah_reorder(medium_catalog, medium_tuning_queries):
  items, queries = medium_catalog
  index = _medium_index(items, medium_tuning_queries)
  assert index.config["scoring"] == "ah" and 1 <= index.config["leaves_to_search"] <= 100
  truth = search_ops.exact_top_k_numpy(queries, items, 20)
  result = _search(index, queries, 20)
  assert search_ops.recall_at_k(result.indices.numpy(), truth) >= 0.9
  # Scores are exact dot products after reordering, best first.
  rows = result.indices.numpy()
  np.testing.assert_allclose(result.scores.numpy(), np.take_along_axis(queries @ items.T, rows, 1), atol=1e-4)
  assert np.all(np.diff(result.scores.numpy(), axis=1) <= 1e-6)
  # Per-request knobs: searching every leaf is at least as good; one leaf is worse.
  everything = _search(
    index, queries, 20, leaves_to_search=tf.constant(100), pre_reorder_num_neighbors=tf.constant(400)
  )
  one_leaf = _search(index, queries, 20, leaves_to_search=tf.constant(1), pre_reorder_num_neighbors=tf.constant(0))
  assert search_ops.recall_at_k(everything.indices.numpy(), truth) >= 0.97
  assert search_ops.recall_at_k(one_leaf.indices.numpy(), truth) < search_ops.recall_at_k(
    everything.indices.numpy(), truth
  )
  assert np.all(one_leaf.indices.numpy() >= 0)  # Still k results: the exact fallback covers short rows.


def test_eligibility(medium_catalog, medium_tuning_queries):
  items, queries = medium_catalog
  rng = np.random.default_rng(0)
  eligible = rng.random(items.shape[0]) > 0.6  # 60% paused: over-fetch alone will often fall short.
  # Fixed search knobs: this test is about the mask, not about what tuning picks on a given run.
  index = _medium_index(items, medium_tuning_queries, leaves_to_search=40, reorder=200, eligible=eligible)
  result = _search(index, queries, 20)
  rows = result.indices.numpy()
  assert np.all(rows >= 0) and np.all(eligible[rows])
  truth = search_ops.exact_top_k_numpy(queries, items, 20, eligible=eligible)
  assert search_ops.recall_at_k(rows, truth) >= 0.85  # Tuned without a mask; still close.
  # Fewer eligible items than k: all of them come back, then -1 / -inf.
  few = np.zeros(items.shape[0], bool)
  few[[3, 77, 1234]] = True
  index.eligible.assign(few)
  result = _search(index, queries[:4], 20)
  assert sorted(result.indices.numpy()[0, :3]) == [3, 77, 1234]
  assert np.all(result.indices.numpy()[:, 3:] == -1) and np.all(np.isneginf(result.scores.numpy()[:, 3:]))


def test_saved_model_round_trip(small_catalog, tmp_path):
  items, queries = small_catalog
  index = base.build_index("scann", items, k=10, scoring="ah", reorder=50)
  module = tf.Module()
  module.index = index
  module.search = tf.function(
    lambda q, leaves, reorder: tuple(index.search(q, 10, leaves_to_search=leaves, pre_reorder_num_neighbors=reorder)),
    input_signature=[tf.TensorSpec([None, 32], tf.float32), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)],
  )
  expected = module.search(tf.constant(queries), 0, 0)
  tf.saved_model.save(
    module, str(tmp_path), options=tf.saved_model.SaveOptions(namespace_whitelist=index.save_namespaces())
  )
  loaded = tf.saved_model.load(str(tmp_path))
  got = loaded.search(tf.constant(queries), tf.constant(0), tf.constant(0))
  # The loaded graph may round differently (other grappler rewrites): same answers up to ties, and
  # AH may pick another candidate to reorder at its boundary (2% of 640 places allowed).
  topk_testlib.assert_top_k_agree(
    got[1].numpy(), expected[1].numpy(), topk_testlib.reference_scores(queries, items), max_unexplained=0.02
  )
  same = got[1].numpy() == expected[1].numpy()
  np.testing.assert_allclose(got[0].numpy()[same], expected[0].numpy()[same], rtol=1e-6)
  # The eligibility mask is a variable of the loaded model: pausing an item takes effect at once.
  top = int(got[1].numpy()[0, 0])
  mask = np.ones(items.shape[0], bool)
  mask[top] = False
  loaded.index.eligible.assign(mask)
  assert top not in loaded.search(tf.constant(queries[:1]), tf.constant(0), tf.constant(0))[1].numpy()


def test_unused_asset_placeholders_are_saved_as_zeros(small_catalog):
  """ScaNN's placeholders for unused assets hold uninitialised memory; the state saves zeros instead."""
  items, queries = small_catalog
  index = base.build_index("scann", items, k=10, scoring="ah", reorder=50)
  placeholders = {
    name: getattr(index.state, name)
    for name in scann_index.ASSET_NAMES
    if getattr(index.state, name).shape.rank == 0 and getattr(index.state, name).dtype != tf.string
  }
  assert {"int8_multipliers", "dp_norms"} <= placeholders.keys()  # Float reordering uses neither.
  assert all(variable.numpy() == 0 for variable in placeholders.values()), placeholders
  # A state whose placeholders hold NaN (as ScaNN's may) is saved with zeros and searches alike.
  poisoned = types.SimpleNamespace(
    **{
      name: tf.constant(np.nan, getattr(index.state, name).dtype)
      if name in placeholders and getattr(index.state, name).dtype.is_floating
      else getattr(index.state, name)
      for name in scann_index.ASSET_NAMES
    }
  )
  rebuilt = scann_index.ScannAssetsModule(poisoned)
  assert all(getattr(rebuilt, name).numpy() == 0 for name in placeholders)
  np.testing.assert_array_equal(_top_10(rebuilt, queries), _top_10(index.state, queries))


def _top_10(state: scann_index.ScannAssetsModule, queries: np.ndarray) -> np.ndarray:
  """Top-10 rows of `queries` from ScaNN's batched search over `state`, with its built defaults."""
  from scann.scann_ops.py import scann_ops  # pylint: disable=g-import-not-at-top

  indices, _ = scann_ops.scann_search_batched(state.searcher(), tf.constant(queries), 10, -1, -1, True)
  return indices.numpy()


def test_single_query_path_matches_batched(medium_catalog, medium_tuning_queries):
  items, queries = medium_catalog
  index = _medium_index(items, medium_tuning_queries, leaves_to_search=10, reorder=100)
  batched = _search(index, queries[:8], 20)
  search = tf.function(lambda q: index.search(q, 20))
  # A batch of one takes ScaNN's single-query op.
  singles = [search(tf.constant(queries[i : i + 1])) for i in range(8)]
  indices = np.concatenate([single.indices.numpy() for single in singles])
  scores = np.concatenate([single.scores.numpy() for single in singles])
  # That op rounds the leaf and AH scores its own way: the same answers up to ties, and 3 of the 160
  # places may hold another candidate, picked at a leaf or reorder boundary by a rounding difference.
  topk_testlib.assert_top_k_agree(
    indices, batched.indices.numpy(), topk_testlib.reference_scores(queries[:8], items), max_unexplained=0.02
  )
  same = indices == batched.indices.numpy()
  np.testing.assert_allclose(scores[same], batched.scores.numpy()[same], rtol=1e-5)


def test_tuning_reaches_target_with_margin(medium_catalog, medium_tuning_queries):
  items, _ = medium_catalog
  index = _medium_index(items, medium_tuning_queries)
  config = index.config
  assert config["tuned_recall"] >= 0.965 and config["reorder"] in (40, 80, 100, 120, 160)
  assert config["build_seconds"] >= config["train_seconds"] > 0


def test_partitioning_is_spherical_for_unit_norm_embeddings_only(small_catalog):
  items, queries = small_catalog
  assert scann_index.has_unit_norms(items)
  spherical = base.build_index("scann", items, k=10, num_leaves=20, leaves_to_search=4)
  assert spherical.config["partitioning"] == "spherical"
  scaled = items * np.linspace(0.5, 2.0, len(items), dtype=np.float32)[:, None]
  generic = base.build_index("scann", scaled, k=10, num_leaves=20, leaves_to_search=4)
  assert generic.config["partitioning"] == "generic"
  # Either partitioning answers the same kind of search.
  for index, vectors in ((spherical, items), (generic, scaled)):
    found = _search(index, queries, 10).indices.numpy()
    assert search_ops.recall_at_k(found, search_ops.exact_top_k_numpy(queries, vectors, 10)) > 0.8
  with pytest.raises(ValueError, match="partitioning"):
    base.build_index("scann", items, k=10, num_leaves=20, partitioning="balanced")


def test_the_same_catalog_builds_the_same_tree(small_catalog):
  # Exporting one checkpoint twice must serve the same answers: the tree's training is seeded alike.
  items, queries = small_catalog
  first, second = (
    base.build_index("scann", items, k=10, num_leaves=20, leaves_to_search=3, scoring="ah", reorder=30)
    for _ in range(2)
  )
  # Each ad in the same leaf, up to ScaNN's multithreaded float sums (never seen to differ here);
  # random initial centers put most ads elsewhere.
  tokens = [index.state.datapoint_to_token.numpy() for index in (first, second)]
  assert np.mean(tokens[0] == tokens[1]) >= 0.99
  same = _search(first, queries, 10).indices.numpy() == _search(second, queries, 10).indices.numpy()
  assert same.mean() >= 0.98, same.mean()


def test_final_candidates(small_catalog):
  items, queries = small_catalog
  index = base.build_index("scann", items, k=10, scoring="ah", reorder=50)
  assert index.config["final_candidates"] == 20  # min(reorder, 2k)
  everything = base.build_index("scann", items, k=10, scoring="ah", reorder=50, final_candidates=50)
  # Reordered candidates come back sorted, so with every item eligible the best 10 of 20 are those of 50.
  np.testing.assert_array_equal(
    _search(index, queries, 10).indices.numpy(), _search(everything, queries, 10).indices.numpy()
  )
  with pytest.raises(ValueError, match="final_candidates"):
    base.build_index("scann", items, k=10, scoring="ah", reorder=50, final_candidates=5)


def test_short_queries_retry_with_every_reordered_candidate(medium_catalog, medium_tuning_queries):
  items, queries = medium_catalog
  index = _medium_index(items, medium_tuning_queries, leaves_to_search=40, reorder=200)
  assert index.config["final_candidates"] == 40
  index.eligible.assign(np.random.default_rng(1).random(items.shape[0]) > 0.7)  # 70% paused: most of 40 are.
  two_stages = _search(index, queries, 20).indices.numpy()
  index.config["final_candidates"] = 200  # A graph that fetches every reordered candidate at once.
  at_once = _search(index, queries, 20).indices.numpy()
  # ScaNN returns candidates sorted, so the retry finds what one search over all of them finds.
  np.testing.assert_array_equal(two_stages, at_once)


def test_indexes_searched_eagerly_each_answer_from_their_own_catalog():
  # An eager ScaNN kernel is shared by every call with the same attributes and keeps the searcher it made
  # first: the second index answered from the first one's catalog (recall 0).
  rng = np.random.default_rng(8)
  catalogs = [rng.normal(size=(n, 8)).astype(np.float32) for n in (300, 400)]
  queries = rng.normal(size=(4, 8)).astype(np.float32)
  for items in catalogs:
    index = scann_index.build_scann(items, k=5)
    rows = index.search(tf.constant(queries), 5).indices.numpy()
    assert search_ops.recall_at_k(rows, search_ops.exact_top_k_numpy(queries, items, 5)) >= 0.9
