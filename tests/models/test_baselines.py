"""Popularity and item co-occurrence baselines by hand, and beside the towers in fgr-eval's report."""

import numpy as np
import pytest
import tensorflow as tf

from models import baselines, evaluation, train
from models.data import schema, sources
from tests.conftest import TINY_DATA

_ROW = {"a": 0, "b": 1, "c": 2, "d": 3}


def _batch(users, items, histories=None):
  histories = histories or [[] for _ in users]
  hist = schema.pad_tokens(histories, 4)
  return {
    schema.USER_ID: np.asarray(users, dtype=object),
    schema.AD_ID: np.asarray(items, dtype=object),
    schema.HIST_IDS: hist,
  }


def test_popularity_ranks_by_training_count_then_row():
  model = baselines.Popularity(4).fit([_batch(["u"] * 5, ["c", "c", "b", "d", "c"])], _ROW.get)
  scores = model.scores(_batch(["x"], ["a"]), _ROW.get)[0]
  assert list(np.argsort(-scores)) == [2, 1, 3, 0]  # c (3), then b and d (1 each: lower row first), a.


def test_item_cooccurrence_recalls_what_followed_the_latest_items():
  # u1 watched a then b; u2 watched a, b, c; u3 watched d alone. Within one step of each other only.
  log = _batch(["u1", "u1", "u2", "u2", "u2", "u3"], ["a", "b", "a", "b", "c", "d"])
  model = baselines.ItemCooccurrence(4, window=1, history=2, decay=0.5).fit([log], _ROW.get)
  batch = _batch(["q", "q"], ["c", "c"], [["a"], ["c", "a"]])
  scores = model.similarity(batch, _ROW.get)
  # sim(a, b) = 2 / sqrt(2 * 2) = 1; a and c never met within one step.
  assert scores[0, 1] == pytest.approx(1.0)
  assert np.argmax(model.scores(batch, _ROW.get)[0]) == 1 and scores[0, 2] == 0
  # The latest item (c) weighs twice the one before it (a): sim(c, b) = 1 / sqrt(1 * 2).
  assert scores[1, 1] == pytest.approx(1 / np.sqrt(2) + 0.5 * 1.0)


def test_top_neighbours_keep_each_items_best_in_order():
  # a-b meet twice, b-c once, d meets nobody: sim(a, b) = 1, sim(b, c) = 1 / sqrt(2).
  log = _batch(["u1", "u1", "u2", "u2", "u2", "u3"], ["a", "b", "a", "b", "c", "d"])
  model = baselines.ItemCooccurrence(4, window=1).fit([log], _ROW.get)
  rows, neighbours, similarities = model.top_neighbours(1)
  assert list(rows) == [0, 1, 2] and neighbours.tolist() == [[1], [0], [1]]  # d has none; b's best is a.
  np.testing.assert_allclose(similarities[:, 0], [1.0, 1.0, 1 / np.sqrt(2)], rtol=1e-6)
  rows, neighbours, similarities = model.top_neighbours(3)
  assert neighbours.tolist() == [[1, -1, -1], [0, 2, -1], [1, -1, -1]] and similarities[0, 1] == 0
  with pytest.raises(ValueError, match="count"):
    model.top_neighbours(0)


def test_item_cooccurrence_rejects_bad_knobs():
  with pytest.raises(ValueError, match="decay"):
    baselines.ItemCooccurrence(4, decay=0.0)


def test_evaluate_reports_baselines_on_the_same_examples(trained_run):
  model, _ = train.restore(trained_run)
  source = sources.open_source(TINY_DATA)
  report = evaluation.evaluate(model.query_tower, model.item_tower, source, ks=(10, 100))
  assert set(report["baselines"]) == {"popularity", "item_cooccurrence"}
  for baseline in report["baselines"].values():
    assert 0 <= baseline["ranking"]["recall@100"] <= 1
    assert baseline["water_level"]["click_coverage"] == pytest.approx(baseline["ranking"]["recall@100"])
    assert "conversion_coverage" in baseline["water_level"]


def test_item_cooccurrence_beats_popularity_on_movielens_by_time(movielens_dir):
  source = sources.open_source(sources.DataSpec(name="movielens", data_dir=movielens_dir, split="time"))
  popularity, cooccurrence = baselines.fit_baselines(source, source.examples("train"))
  hit = {}
  for model in (popularity, cooccurrence):
    score = evaluation.baseline_scorer(model, source.row_of)
    ranked = evaluation.rank_examples(score, source.row_of, source.examples("test", 512), 100)
    hit[model.name] = float(np.mean(ranked["rank"] < 100))
  # Published for this split: popularity 0.27 and co-occurrence over the last 10 items 0.57.
  assert hit["popularity"] == pytest.approx(0.27, abs=0.03)
  assert hit["item_cooccurrence"] > 2 * hit["popularity"]


def test_rank_examples_without_history_ranks_among_the_other_items():
  # Item scores 3 > 2 > 1 > 0 for rows a, b, c, d alike for every query.
  score = lambda batch: tf.constant(np.tile([[3.0, 2.0, 1.0, 0.0]], [len(batch[schema.AD_ID]), 1]))  # noqa: E731
  batch = _batch(["u", "v", "w"], ["c", "c", "a"], [["a", "d"], [], ["a"]])
  ranked = evaluation.rank_examples(score, _ROW.get, [batch], 2, exclude_history=True)
  # u: a is in its history, so c comes second, after b; v excludes nothing; w's clicked item is in its
  # history, so it can never be recalled (ranked behind every other item).
  assert ranked["rank"].tolist() == [1, 2, 3]
  assert ranked["recalled"].tolist() == [[1, 2], [0, 1], [1, 2]]
  plain = evaluation.rank_examples(score, _ROW.get, [batch], 2)
  assert plain["rank"].tolist() == [2, 2, 0]
