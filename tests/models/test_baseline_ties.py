"""Item co-occurrence ranks by its own score first: popularity orders only exact ties."""

import numpy as np

from models import baselines, evaluation
from models.data import schema

_ROW = {"a": 0, "b": 1, "c": 2, "d": 3}
# u1 watched a then b, u2 d then c; u3 c and u4 d alone. Counts a 1, b 1, c 2, d 2; within one step:
# sim(a, b) = 1 / sqrt(1 * 1) = 1, sim(d, c) = 1 / sqrt(2 * 2) = 0.5.
_LOG = {
  schema.USER_ID: np.asarray(["u1", "u1", "u2", "u2", "u3", "u4"], dtype=object),
  schema.AD_ID: np.asarray(["a", "b", "d", "c", "c", "d"], dtype=object),
}
# One query whose latest item is d, then a: score(c) = sim(d, c) = 0.5, score(b) = decay * sim(a, b).
_QUERY = {
  schema.USER_ID: np.asarray(["q"], dtype=object),
  schema.AD_ID: np.asarray(["b"], dtype=object),
  schema.HIST_IDS: schema.pad_tokens([["d", "a"]], 4),
}


def _ranking(decay: float) -> list[int]:
  model = baselines.ItemCooccurrence(4, window=1, history=2, decay=decay).fit([_LOG], _ROW.get)
  return list(np.argsort(-model.scores(_QUERY, _ROW.get)[0], kind="stable"))


def test_a_higher_score_beats_a_more_popular_item_however_close():
  # b scores 0.5001 against the more popular c's 0.5: b comes first. The popularity tie-break, added
  # at 1e-3 scale, put c first (0.5 + 7.5e-4 > 0.5001 + 0).
  assert _ranking(0.5001) == [1, 2, 3, 0]  # b, c, then the zero scores by popularity: d (2), a (1).


def test_equal_scores_fall_back_to_popularity():
  assert _ranking(0.5) == [2, 1, 3, 0]  # b and c tie at 0.5: the more popular c first.


def test_the_rank_fgr_eval_reports_follows_the_score():
  model = baselines.ItemCooccurrence(4, window=1, history=2, decay=0.5001).fit([_LOG], _ROW.get)
  ranked = evaluation.rank_examples(evaluation.baseline_scorer(model, _ROW.get), _ROW.get, [_QUERY], 2)
  assert ranked["rank"].tolist() == [0] and ranked["recalled"].tolist() == [[1, 2]]


def test_similarity_is_the_recency_weighted_sum():
  model = baselines.ItemCooccurrence(4, window=1, history=2, decay=0.5001).fit([_LOG], _ROW.get)
  np.testing.assert_allclose(model.similarity(_QUERY, _ROW.get)[0], [0.0, 0.5001, 0.5, 0.0])
