"""Non-finite item embeddings are refused by every index build and by a refresh's new rows, naming them,
rather than ranking a NaN/inf row first as an empty slot or losing int8's scales to it."""

import numpy as np
import pytest

from engine import base
from export import refresh_apply, refresh_delta, refresh_state


@pytest.fixture(scope="module")
def items() -> np.ndarray:
  return np.random.default_rng(5).normal(size=(200, 8)).astype(np.float32)


@pytest.mark.parametrize("backend", base.available_backends())
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_build_refuses_non_finite_rows_naming_them(items, backend, bad):
  embeddings = items.copy()
  embeddings[[3, 150], 0] = bad
  with pytest.raises(ValueError, match=r"item embeddings must be finite: 2 of 200 .*rows 3, 150\)"):
    base.build_index(backend, embeddings, k=5)


def test_many_bad_rows_are_counted_and_the_first_five_named(items):
  embeddings = items.copy()
  embeddings[10:40] = np.nan
  with pytest.raises(ValueError, match=r"30 of 200 .*rows 10, 11, 12, 13, 14, \.\.\.\)"):
    base.check_finite_embeddings(embeddings, chunk=16)  # Rows past the first chunk are found too.
  base.check_finite_embeddings(items, chunk=16)  # A finite catalog passes.


def test_refresh_refuses_new_ads_with_non_finite_embeddings(items):
  state = refresh_state.CatalogState(
    ids=np.asarray([f"a{i}" for i in range(4)], dtype=object), embeddings=items[:4], eligible=np.ones(4, bool)
  )
  delta = refresh_delta.parse_lines(['{"ad_id": "a1", "category": "c"}', '{"ad_id": "new", "category": "c"}'])

  def embed(features):  # A tower that embeds the changed ad "a1" to NaN.
    return np.where(features["ad_id"][:, None] == "a1", np.nan, 1.0).astype(np.float32) * np.ones([1, 8], np.float32)

  with pytest.raises(ValueError, match=r"item embeddings must be finite: 1 of 2 .*ads 'a1'\)"):
    refresh_apply.apply_delta(state, state.row_of(), delta, embed)
  new_state, counts, _ = refresh_apply.apply_delta(state, state.row_of(), delta, lambda f: np.ones([2, 8], np.float32))
  assert counts["added"] == 1 and np.isfinite(new_state.embeddings).all()
