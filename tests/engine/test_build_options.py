"""Index build options at the edges: 0 means what omitting the option does (tune, or
derive from the catalog), and values out of range are refused naming the option, before anything trains."""

import numpy as np
import pytest
import tensorflow as tf

from engine import base, search_ops

K = 10


@pytest.fixture(scope="module")
def catalog() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(7)
  items = rng.normal(size=(1000, 16)).astype(np.float32)
  return items / np.linalg.norm(items, axis=1, keepdims=True), rng.normal(size=(64, 16)).astype(np.float32)


def _recall(index, items, queries):
  rows = tf.function(lambda q: index.search(q, K).indices)(tf.constant(queries)).numpy()
  return search_ops.recall_at_k(rows, search_ops.exact_top_k_numpy(queries, items, K))


def test_partitioned_probes_0_is_tuned_as_when_omitted(catalog):
  items, queries = catalog
  tuned = base.build_index("partitioned", items, k=K, tuning_queries=queries)
  zero = base.build_index("partitioned", items, k=K, tuning_queries=queries, probes=0, num_partitions=0)
  assert zero.num_partitions == tuned.num_partitions == 32  # About sqrt(1000).
  assert zero.default_probes == tuned.default_probes > 1  # Was 1 probe, untuned (recall 0.26 in the audit).
  assert _recall(zero, items, queries) >= 0.9
  # Probes above the derived number of partitions score them all: an exact answer.
  assert base.build_index("partitioned", items, k=K, probes=100).default_probes == 32


@pytest.mark.parametrize(
  "options,named",
  [
    ({"probes": -2}, "probes must be 0 .*or positive, got -2"),
    ({"probes": 1.5}, "probes must be .*got 1.5"),
    ({"probes": 9, "num_partitions": 8}, r"probes must be .*at most num_partitions \(8\), got 9"),
    ({"num_partitions": -3}, r"num_partitions must be 0 .*or 1 to 1000, the number of ads, got -3"),
    ({"num_partitions": 1001}, "num_partitions must be .*1 to 1000.*got 1001"),
    (
      {"num_partitions": 50, "training_sample_size": 40},
      r"training_sample_size must be at least num_partitions \(50\)",
    ),
    ({"kmeans_iterations": -1}, "kmeans_iterations must be an integer of at least 0, got -1"),
    ({"target_recall": 7}, r"target_recall must be a number in \[0, 1\], got 7"),
    ({"target_recall": float("nan")}, "target_recall must be .*got nan"),
    ({"num_tuning_queries": 0}, "num_tuning_queries must be an integer of at least 1, got 0"),
  ],
)
def test_partitioned_refuses_options_out_of_range_by_name(catalog, options, named):
  with pytest.raises(ValueError, match=named):
    base.build_index("partitioned", catalog[0], k=K, **options)


@pytest.mark.parametrize("backend", ["int8", "binary"])
def test_rerank_candidates_0_is_tuned_as_when_omitted(catalog, backend):
  items, queries = catalog
  options = {"learned": False} if backend == "binary" else {}
  # A target no fixed guess reaches: 0 built an untuned index with the guess (k for int8, 10k for binary).
  tuned = base.build_index(backend, items, k=K, tuning_queries=queries, target_recall=1.0, **options)
  zero = base.build_index(
    backend, items, k=K, tuning_queries=queries, target_recall=1.0, rerank_candidates=0, **options
  )
  assert zero.rerank_candidates == tuned.rerank_candidates > (10 * K if backend == "binary" else K)
  for value, named in ((-5, "got -5"), (2.5, "got 2.5"), ("all", "got 'all'")):
    with pytest.raises(
      ValueError, match=f"rerank_candidates must be 0 \\(tuned for target_recall\\) or positive, {named}"
    ):
      base.build_index(backend, items, k=K, rerank_candidates=value, **options)
  with pytest.raises(ValueError, match="target_recall must be a number in"):
    base.build_index(backend, items, k=K, target_recall=-0.5, **options)


@pytest.mark.parametrize("backend", base.available_backends())
@pytest.mark.parametrize("k", [0, -1, 1001])
def test_k_outside_the_catalog_is_refused_by_every_backend(catalog, backend, k):
  # Was a TopKV2 message (int8, binary, partitioned) or an index that answers nothing (brute_force, k=0).
  with pytest.raises(ValueError, match=rf"k must be in \[1, 1000\] \(the catalog size\), got {k}"):
    base.build_index(backend, catalog[0], k=k)
