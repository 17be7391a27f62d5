"""Following-sequence examples: each training event with the same user's next events as its sequence."""

import numpy as np

from models.data import context, schema, sources
from tests.conftest import TINY_DATA


def _all(batches, names):
  batches = list(batches)
  return {name: np.concatenate([b[name] for b in batches]) for name in names}


def test_following_examples_hold_each_users_next_training_events_nearest_first():
  source = sources.open_source(TINY_DATA)
  names = (schema.USER_ID, schema.AD_ID, schema.HIST_IDS, schema.HIST_CATEGORIES)
  train = _all(source.examples("train"), names)
  following = _all(context.following_examples(source, chunk_size=500), names)
  np.testing.assert_array_equal(following[schema.AD_ID], train[schema.AD_ID])  # Same events, same order.
  by_user: dict[str, list[str]] = {}
  for user, ad_id in zip(train[schema.USER_ID], train[schema.AD_ID]):
    by_user.setdefault(user, []).append(ad_id)
  seen: dict[str, int] = {}
  for user, hist in zip(following[schema.USER_ID], following[schema.HIST_IDS]):
    position = seen.get(user, 0)
    seen[user] = position + 1
    expected = by_user[user][position + 1 : position + 1 + schema.HISTORY_LEN]
    assert list(hist[: len(expected)]) == expected and all(h == schema.PAD for h in hist[len(expected) :])
  # Side info follows the ids, and no test event is ever read.
  test_ids = set(_all(source.examples("test"), (schema.AD_ID,))[schema.AD_ID]) - set(train[schema.AD_ID])
  assert not test_ids & set(following[schema.HIST_IDS].ravel())
  row = source.features(np.asarray([source.row_of(following[schema.HIST_IDS][0][0])]))
  assert following[schema.HIST_CATEGORIES][0][0] == row[schema.CATEGORY][0]
