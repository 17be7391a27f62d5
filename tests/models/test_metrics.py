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
