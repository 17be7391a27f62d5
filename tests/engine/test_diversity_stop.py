"""A DPP row that runs out of candidates stops for good: its list is padded at the end, never holed."""

import numpy as np
import pytest

from engine import diversity


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_dpp_with_a_window_past_the_width_pads_after_its_last_pick(jit):
  # d = 2 and window 2: once two picks span the plane, no candidate adds a direction (-1). The next
  # step used to slide the window past that phantom pick and pick again: [0, 1, -1, 2, 3].
  embeddings = np.array([[[1, 0], [0, 1], [1, 1], [1, -1], [2, 1]]], np.float32)
  scores = np.array([[3.0, 2.0, 1.0, 0.5, 0.2]], np.float32)
  valid = np.ones([1, 5], bool)
  got = diversity.dpp(embeddings, scores, valid, 5, 0.5, 2, jit_compile=jit).numpy()
  np.testing.assert_array_equal(got, [[0, 1, -1, -1, -1]])


def test_every_method_returns_its_picks_first_and_padding_last():
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=[4, 30, 3]).astype(np.float32)
  scores = rng.normal(size=[4, 30]).astype(np.float32)
  valid = rng.uniform(size=[4, 30]) > 0.3
  for method in diversity.METHODS:
    got = diversity.rerank(method, embeddings, scores, valid, 20, 5, 0.5, 0.5).numpy()
    for row in got:
      picked = row >= 0
      assert not (~picked[:-1] & picked[1:]).any(), f"{method}: a pick after padding in {row}"
