"""Exact, int8, binary and partitioned backends: recall vs NumPy, eligibility and options."""

import numpy as np
import pytest
import tensorflow as tf

from engine import base, hashing, int8_index, search_ops
from tests import topk_testlib


def _search(index, queries, k, **options):
  return tf.function(lambda q: index.search(q, k, **options))(tf.constant(queries))


def _recall(index, items, queries, k, eligible=None, **options):
  result = _search(index, queries, k, **options)
  return search_ops.recall_at_k(result.indices.numpy(), search_ops.exact_top_k_numpy(queries, items, k, eligible))


@pytest.mark.parametrize("options", [{}, {"jit_compile": True}, {"dtype": "bfloat16"}])
def test_brute_force_matches_numpy(small_catalog, options):
  items, queries = small_catalog
  index = base.build_index("brute_force", items, k=10, **options)
  result = _search(index, queries, 10)
  truth = search_ops.exact_top_k_numpy(queries, items, 10)
  if "dtype" in options:
    assert search_ops.recall_at_k(result.indices.numpy(), truth) >= 0.9
  else:  # Exact search, but TF's matmul (or XLA's) and NumPy's round differently: equal up to ties.
    topk_testlib.assert_top_k_agree(result.indices.numpy(), truth, topk_testlib.reference_scores(queries, items))
    np.testing.assert_allclose(result.scores.numpy(), np.take_along_axis(queries @ items.T, truth, 1), rtol=1e-5)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_int8_quantisation_and_recall(small_catalog, jit_compile):
  items, queries = small_catalog
  codes, scales = int8_index.quantize(items)
  assert codes.dtype == np.int8 and np.abs(codes.astype(np.float32) * scales - items).max() <= scales.max() / 2 + 1e-6
  index = base.build_index("int8", items, k=20, jit_compile=jit_compile)
  # The codes' scores: float32 under XLA; without it the scaled queries are rounded to bfloat16 (8
  # significant bits) for the bf16 matmul.
  approximate = tf.function(index.approximate_scores)(tf.constant(queries)).numpy()
  dequantised = queries @ (codes.astype(np.float32) * scales).T
  np.testing.assert_allclose(
    approximate, dequantised, rtol=0, atol=1e-4 if jit_compile else 2e-2 * np.abs(dequantised).max()
  )
  assert index.memory_breakdown()["codes"] == items.size + 4 * items.shape[1]  # 1 byte per dimension.
  assert _recall(index, items, queries, 20) >= 0.99
  result = _search(index, queries, 20)  # Reranked scores are exact dot products.
  np.testing.assert_allclose(
    result.scores.numpy(), np.take_along_axis(queries @ items.T, result.indices.numpy(), 1), atol=1e-5
  )


def test_sign_hash_packing_matches_numpy(small_catalog):
  items, _ = small_catalog
  hasher = hashing.random_sign_hash(items, bits=128)

  def unpack(codes):
    return np.unpackbits(codes.view(np.uint8), axis=1, bitorder="little").astype(bool)

  bits = unpack(hasher.pack_numpy(items[:50]))
  np.testing.assert_array_equal(bits, items[:50] @ hasher.projection.numpy() + hasher.bias.numpy() > 0)
  # TF's matmul rounds otherwise than NumPy's: a projection within rounding of 0 may take either sign.
  projections = items[:50].astype(np.float64) @ hasher.projection.numpy() + hasher.bias.numpy()
  settled = np.abs(projections) > 1e-5
  np.testing.assert_array_equal(unpack(hasher.pack(tf.constant(items[:50])).numpy())[settled], bits[settled])
  assert settled.mean() > 0.99


def test_binary_learned_beats_random_hyperplanes(medium_catalog):
  items, queries = medium_catalog
  k, candidates = 20, 300
  learned = base.build_index("binary", items, k=k, rerank_candidates=candidates, train_steps=300)
  baseline = base.build_index("binary", items, k=k, rerank_candidates=candidates, learned=False)
  assert learned.memory_breakdown()["codes"] == 16 * items.shape[0]  # 128 bits per item.
  learned_recall = _recall(learned, items, queries, k)
  assert learned_recall >= 0.9
  assert learned_recall > _recall(baseline, items, queries, k)
  # Hamming distances from the TF scan match NumPy's popcount of the XORed codes.
  codes = learned.hasher.pack_numpy(items)
  query_code = learned.hasher.pack_numpy(queries[:1])
  expected = np.unpackbits((codes ^ query_code).view(np.uint8), axis=1).sum(1)
  from engine import binary_index  # pylint: disable=g-import-not-at-top

  similarity = binary_index._hamming_similarity(tf.constant(query_code[0]), learned.codes, learned.eligible, 128)  # pylint: disable=protected-access
  np.testing.assert_array_equal(129 - similarity.numpy().astype(np.int64), expected)


def test_partitioned_recall_and_probes(medium_catalog, medium_tuning_queries):
  items, queries = medium_catalog
  index = base.build_index("partitioned", items, k=20, tuning_queries=medium_tuning_queries)
  assert index.num_partitions == 173 and 1 <= index.default_probes <= 173
  assert _recall(index, items, queries, 20) >= 0.93
  everything = _search(index, queries, 20, probes=tf.constant(173))  # Every partition: exact, up to ties.
  topk_testlib.assert_top_k_agree(
    everything.indices.numpy(),
    search_ops.exact_top_k_numpy(queries, items, 20),
    topk_testlib.reference_scores(queries, items),
  )
  assert _recall(index, items, queries, 20, probes=tf.constant(1)) < 0.93


# The in-graph backends, each with options that keep its build small.
_STOCK_BACKENDS = [
  ("brute_force", {}),
  ("int8", {}),
  ("binary", {"learned": False, "rerank_candidates": 200}),
  ("partitioned", {"probes": 4}),
]


@pytest.mark.parametrize("backend,options", _STOCK_BACKENDS)
def test_eligibility(medium_catalog, backend, options):
  items, queries = medium_catalog
  eligible = np.random.default_rng(0).random(items.shape[0]) > 0.7  # 70% paused.
  index = base.build_index(backend, items, k=20, eligible=eligible, **options)
  rows = _search(index, queries, 20).indices.numpy()
  assert np.all(rows >= 0) and np.all(eligible[rows])
  assert search_ops.recall_at_k(rows, search_ops.exact_top_k_numpy(queries, items, 20, eligible)) >= 0.8
  few = np.zeros(items.shape[0], bool)
  few[[5, 500, 5000]] = True
  index.eligible.assign(few)
  result = _search(index, queries[:3], 20)
  assert np.all(np.sort(result.indices.numpy()[:, :3], axis=1) == [5, 500, 5000])
  assert np.all(result.indices.numpy()[:, 3:] == -1) and np.all(np.isneginf(result.scores.numpy()[:, 3:]))


@pytest.mark.parametrize("backend,options", [*_STOCK_BACKENDS, ("scann", {})])
def test_an_empty_batch_gets_an_empty_answer(small_catalog, backend, options):
  # A signature takes [None, d] queries; a request with no rows is valid and answers [0, k].
  items, _ = small_catalog
  index = base.build_index(backend, items, k=10, **options)
  search = tf.function(lambda q: index.search(q, 10), input_signature=[tf.TensorSpec([None, items.shape[1]])])
  result = search(tf.zeros([0, items.shape[1]]))
  assert result.indices.shape == result.scores.shape == (0, 10)


def test_exact_top_k_tf_matches_numpy(small_catalog):
  items, queries = small_catalog
  topk_testlib.assert_top_k_agree(
    search_ops.exact_top_k_tf(queries, items, 10, chunk=16),
    search_ops.exact_top_k_numpy(queries, items, 10),
    topk_testlib.reference_scores(queries, items),
  )


def test_exact_search_over_fewer_eligible_items_than_k_is_full_recall():
  """With 5 eligible items and k = 8, exact search finds all 5: recall 1 (it was 5/8 per query)."""
  rng = np.random.default_rng(0)
  items, queries = rng.normal(size=[8, 4]).astype(np.float32), rng.normal(size=[3, 4]).astype(np.float32)
  eligible = np.array([True, False, True, True, False, True, False, True])
  truth = search_ops.exact_top_k_numpy(queries, items, 8, eligible)
  assert (truth[:, 5:] == -1).all() and all(set(row[:5]) == {0, 2, 3, 5, 7} for row in truth)
  index = base.build_index("brute_force", items, k=8, eligible=eligible)
  assert _recall(index, items, queries, 8, eligible) == 1.0
