"""Binary index codes at the edges: long codes keep exact matches first, bad code lengths are refused by
name, and the learned hash trains on catalogs smaller than its sampling."""

import numpy as np
import pytest
import tensorflow as tf

from engine import base, binary_index, hashing

K = 10


@pytest.fixture(scope="module")
def items() -> np.ndarray:
  vectors = np.random.default_rng(6).normal(size=(2000, 32)).astype(np.float32)
  return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("bits", [128, 192, 256, 320])
def test_a_query_equal_to_an_item_finds_it_first(items, bits):
  # Hamming distance 0 must be the highest similarity at every code length (at 256 bits it wrapped in uint8).
  index = base.build_index("binary", items, k=K, bits=bits, learned=False, rerank_candidates=K)
  rows = tf.function(lambda q: index.search(q, K).indices)(tf.constant(items[:50])).numpy()
  np.testing.assert_array_equal(rows[:, 0], np.arange(50))
  codes = index.hasher.pack_numpy(items)
  similarity = binary_index._hamming_similarity(tf.constant(codes[7]), index.codes, index.eligible, bits)  # pylint: disable=protected-access
  distance = np.unpackbits((codes ^ codes[7]).view(np.uint8), axis=1).sum(1)
  np.testing.assert_array_equal(similarity.numpy().astype(np.int64), bits + 1 - distance)


@pytest.mark.parametrize("bits", [0, -64, 100, 128.0, True, "128"])
def test_bad_code_lengths_are_refused_by_name(items, bits):
  for learned in (True, False):  # bits=0 used to abort the process in oneDNN while training.
    with pytest.raises(ValueError, match="bits must be a positive multiple of 64"):
      base.build_index("binary", items[:200], k=K, bits=bits, learned=learned)
  with pytest.raises(ValueError, match="bits must be a positive multiple of 64"):
    hashing.SignHash(np.zeros([32, 0], np.float32), np.zeros([0], np.float32))


@pytest.mark.parametrize("num_items", [1, 2, 20, 127])
def test_learned_hash_trains_on_a_catalog_smaller_than_its_sampling(items, num_items):
  k = min(5, num_items)
  index = base.build_index("binary", items[:num_items], k=k, train_steps=5)
  rows = tf.function(lambda q: index.search(q, k).indices)(tf.constant(items[:num_items])).numpy()
  # Every item is a candidate (the rerank count is capped at the catalog), so each query finds itself first.
  np.testing.assert_array_equal(rows[:, 0], np.arange(num_items))
