"""Recall/HitRate/NDCG@K and the water-level metrics on tiny hand-made examples, and fgr-eval's report."""

import numpy as np
import pytest

from models import evaluation, metrics, train
from models.data import sources
from tests.conftest import TINY_DATA


def test_ranking_metrics_by_hand():
  ranks = np.array([0, 2, 7, 40])  # 0-based ranks of each query's relevant item.
  out = metrics.ranking_metrics(ranks, ks=(1, 5, 10))
  assert out["recall@1"] == out["hit_rate@1"] == 0.25
  assert out["recall@5"] == 0.5 and out["recall@10"] == 0.75
  np.testing.assert_allclose(out["ndcg@1"], 1.0 / 4)
  np.testing.assert_allclose(out["ndcg@5"], (1.0 + 1.0 / np.log2(4)) / 4)
  np.testing.assert_allclose(out["ndcg@10"], (1.0 + 0.5 + 1.0 / np.log2(9)) / 4)


def test_water_level_metrics_by_hand():
  # Catalog of 6 items: categories A A B B C C; item 5 was added after training.
  categories = np.array(["A", "A", "B", "B", "C", "C"])
  new_items = np.array([False, False, False, False, False, True])
  recalled = np.array([[0, 1], [2, 4], [5, 4], [3, 0]])
  positives = np.array([1, 3, 5, 4])
  converted = np.array([True, True, False, False])
  out = metrics.water_level_metrics(recalled, positives, converted, categories, new_items)
  assert out["click_coverage"] == 0.5  # queries 0 and 2 recall their click.
  assert out["conversion_coverage"] == 0.5  # of the converted queries 0 and 1, query 0.
  # Query categories A, B, C, C: off-category recalls are 0 + 1 + 0 + 2 out of 8.
  assert out["noise_ratio"] == 3 / 8
  assert out["new_item_coverage"] == 1.0 and out["num_new_item_clicks"] == 1
  assert out["warm_item_coverage"] == pytest.approx(1 / 3)
  assert out["new_to_warm_ratio"] == pytest.approx(3.0)


def test_evaluate_agrees_with_tfrs_factorized_top_k(trained_run):
  model, _ = train.restore(trained_run)
  source = sources.open_source(TINY_DATA)
  report = evaluation.evaluate(model.query_tower, model.item_tower, source, ks=(10, 100))
  tfrs_top_k = evaluation.top_k_accuracy(
    model.query_tower, model.item_tower, source, source.examples("test"), ks=(10, 100)
  )
  for k in (10, 100):
    assert report["ranking"][f"recall@{k}"] == pytest.approx(tfrs_top_k[f"top_{k}"], abs=2e-3)
  water = report["water_level"]
  assert water["click_coverage"] == pytest.approx(report["ranking"]["recall@100"])
  assert 0 <= water["noise_ratio"] <= 1 and "conversion_coverage" in water and "new_item_coverage" in water


# Catalog of 6 items: categories A A B B C C, 2-d embeddings (item 5 is all zeros).
CATEGORIES = np.array(["A", "A", "B", "B", "C", "C"], dtype=object)
EMBEDDINGS = np.array([[1, 0], [1, 0], [0, 1], [-1, 0], [0, 2], [0, 0]], dtype=np.float32)
# -1 pads lists shorter than K = 3; the last list is empty.
PADDED = np.array([[0, 2, 3], [1, -1, -1], [4, 2, -1], [-1, -1, -1]])
PADDED_POSITIVES = np.array([3, 1, 5, 0])


def test_revenue_proxy_weighs_recalled_clicks_by_their_bid():
  bids = np.array([2.0, 1.0, 4.0, 3.0], dtype=np.float32)
  out = metrics.revenue_proxy(PADDED, PADDED_POSITIVES, bids)
  # Queries 0 and 1 recall their click (bids 2 and 1); padding never matches.
  assert out == {"revenue_per_query": pytest.approx(3 / 4), "revenue_share": pytest.approx(3 / 10)}
  assert np.isnan(metrics.revenue_proxy(PADDED, PADDED_POSITIVES, np.zeros(4))["revenue_share"])


def test_ilad_and_category_coverage_skip_padding():
  # List 0: items 0, 2, 3 at cosine distances 1 (0-2), 2 (0-3), 1 (2-3): mean 4/3. List 1 has one
  # valid item and list 3 none, so they are skipped. List 2: items 4 and 2 point the same way: 0.
  assert metrics.ilad(PADDED, EMBEDDINGS) == pytest.approx(2 / 3)
  assert metrics.ilad(np.array([[5, 0]]), EMBEDDINGS) == pytest.approx(1.0)  # A zero vector is at distance 1.
  assert np.isnan(metrics.ilad(np.array([[1, -1]]), EMBEDDINGS))
  # Distinct categories: {A, B}, {A}, {C, B}, {} -> 2, 1, 2, 0.
  assert metrics.category_coverage(PADDED, CATEGORIES) == pytest.approx(5 / 4)
  assert metrics.diversity_metrics(PADDED, CATEGORIES, EMBEDDINGS, ks=(2, 5)) == {
    "ilad@2": pytest.approx(1 / 2),  # Lists 0 (distance 1) and 2 (0).
    "categories@2": pytest.approx(5 / 4),
  }


def test_ilad_in_chunks_equals_the_pairwise_definition():
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(40, 8))
  recalled = rng.integers(0, 40, size=(30, 6))
  recalled[rng.random(recalled.shape) < 0.3] = -1
  expected = []
  for row in recalled:
    units = embeddings[row[row >= 0]] / np.linalg.norm(embeddings[row[row >= 0]], axis=1, keepdims=True)
    m = len(units)
    if m >= 2:
      expected.append(np.mean([1 - units[i] @ units[j] for i in range(m) for j in range(i + 1, m)]))
  assert metrics.ilad(recalled, embeddings, chunk_size=7) == pytest.approx(np.mean(expected))


def test_water_level_metrics_add_revenue_diversity_and_logged_query_categories():
  converted = np.array([True, False, True, False])
  base = metrics.water_level_metrics(PADDED, PADDED_POSITIVES, converted, CATEGORIES, None)
  assert set(base) == {"click_coverage", "noise_ratio", "conversion_coverage", "num_conversions"}
  assert base["click_coverage"] == 0.5
  # Query categories B, A, C, A (the clicks'): off-category items 1 + 0 + 1 of 6 valid ones.
  assert base["noise_ratio"] == pytest.approx(1 / 3)
  out = metrics.water_level_metrics(
    PADDED,
    PADDED_POSITIVES,
    converted,
    CATEGORIES,
    None,
    query_categories=np.array(["A", "A", "C", "A"], dtype=object),
    bids=np.array([2.0, 1.0, 4.0, 3.0]),
    item_embeddings=EMBEDDINGS,
    diversity_ks=(2, 3),
  )
  assert out["noise_ratio"] == pytest.approx(3 / 6)  # Query 0 is about A now: items 2 and 3 are off.
  assert out["revenue_per_query"] == pytest.approx(3 / 4) and out["revenue_share"] == pytest.approx(3 / 10)
  assert out["ilad@3"] == pytest.approx(2 / 3) and out["categories@3"] == pytest.approx(5 / 4)
  assert out["ilad@2"] == pytest.approx(1 / 2) and out["categories@2"] == pytest.approx(5 / 4)
  assert {name: out[name] for name in base if name != "noise_ratio"} == {
    n: v for n, v in base.items() if n != "noise_ratio"
  }
