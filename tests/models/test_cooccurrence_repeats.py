"""ItemCF counts a user's repeat of an item once per pair, as its formula says, in the baseline and the served table."""

import numpy as np
import pytest

from models import baselines
from models.data import schema

_ROW = {"a": 0, "b": 1}


def test_a_repeat_counts_once_per_pair():
  # u takes a, b, a: within two steps, a-b meet twice (c = 2) and a meets itself once (c(a, a) = 1).
  log = {
    schema.USER_ID: np.asarray(["u", "u", "u"], dtype=object),
    schema.AD_ID: np.asarray(["a", "b", "a"], dtype=object),
  }
  model = baselines.ItemCooccurrence(2, window=2).fit([log], _ROW.get)
  rows, neighbours, similarities = model.top_neighbours(2)
  # n_a = 2, n_b = 1: sim(a, b) = 2 / sqrt(2), sim(a, a) = 1 / sqrt(2 * 2) (it was counted twice: 1.0).
  assert list(rows) == [0, 1] and neighbours.tolist() == [[1, 0], [0, -1]]
  np.testing.assert_allclose(similarities, [[2 / np.sqrt(2), 0.5], [2 / np.sqrt(2), 0.0]], rtol=1e-6)
  scores = model.similarity(
    {schema.AD_ID: np.asarray(["x"], dtype=object), schema.HIST_IDS: np.asarray([["a"]])}, _ROW.get
  )
  assert scores[0, 0] == pytest.approx(0.5, rel=1e-6)
