"""SSD ranks candidates inside the window's span by score alone: their residual is 0, not float32 noise."""

import numpy as np
import pytest

from engine import diversity


@pytest.mark.parametrize("jit_compile", [False, True])
def test_once_the_window_spans_the_space_picks_follow_the_score(jit_compile):
  # In 2 dimensions two independent picks span the space, so every later candidate's residual is 0 and
  # gamma has nothing to reward: the remaining picks must come in score order, however large gamma is.
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=[4, 30, 2]).astype(np.float32)
  scores = rng.normal(size=[4, 30]).astype(np.float32)
  picks = diversity.ssd(embeddings, scores, np.ones([4, 30], bool), 12, 5, 1000.0, jit_compile).numpy()
  for row, (chosen, row_scores) in enumerate(zip(picks, scores)):
    later = chosen[2:]
    assert np.all(later >= 0), row
    np.testing.assert_array_equal(row_scores[later], np.sort(row_scores[later])[::-1], err_msg=f"row {row}")
