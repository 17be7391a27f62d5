"""Binary index codes at the edges: long codes keep exact matches first."""

import numpy as np
import pytest
import tensorflow as tf

from engine import base, binary_index

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
