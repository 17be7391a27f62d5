"""Per-request knobs of the in-graph backends: 0 is the built default, positive values are capped, and
negative ones are INVALID_ARGUMENT naming the knob (as ScaNN's are), never the default in silence."""

import numpy as np
import pytest
import tensorflow as tf

from engine import base, search_ops

K = 5


@pytest.fixture(scope="module")
def items() -> np.ndarray:
  return np.random.default_rng(4).normal(size=(300, 8)).astype(np.float32)


_BACKENDS = [
  ("int8", {"rerank_candidates": 20}, "rerank_candidates"),
  ("binary", {"learned": False, "rerank_candidates": 20}, "rerank_candidates"),
  ("partitioned", {"num_partitions": 10, "probes": 2}, "probes"),
]


@pytest.mark.parametrize("backend,options,knob", _BACKENDS)
def test_negative_knob_is_invalid_argument(items, backend, options, knob):
  index = base.build_index(backend, items, k=K, **options)
  search = tf.function(lambda q, value: index.search(q, K, **{knob: value}).indices)
  queries = tf.constant(items[:3])
  truth = search_ops.exact_top_k_numpy(items[:3], items, K)
  default = search(queries, tf.constant(0)).numpy()
  assert np.all(default >= 0)
  np.testing.assert_array_equal(search(queries, tf.constant(options[knob])).numpy(), default)
  # More than the catalog (or the partitions) holds is capped: every row is scored, so the answer is exact.
  assert search_ops.recall_at_k(search(queries, tf.constant(100_000)).numpy(), truth) == 1.0
  for value in (-7, -(2**31)):
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{knob} must be 0 .*got.*{value}"):
      search(queries, tf.constant(value))
