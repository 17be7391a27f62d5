"""The time and leave-last-out splits, validation from the latest training slice, and the cold-start held-out items."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from models import train
from models.data import cold_start, movielens, schema, sources, synthetic
from tests.conftest import TINY_DATA

_NAMES = schema.QUERY_FEATURE_NAMES + schema.ITEM_FEATURE_NAMES


def _all(source, split, names=_NAMES):
  batches = list(source.examples(split))
  return {k: np.concatenate([b[k] for b in batches]) for k in names}


def test_movielens_leave_last_out_holds_out_each_users_last_rating(movielens_dir):
  data = movielens.MovieLens100K(movielens_dir, split="leave_last_out")
  train, test = _all(data, "train"), _all(data, "test")
  assert len(test[schema.AD_ID]) == 943 and len(set(test[schema.USER_ID])) == 943
  assert len(train[schema.AD_ID]) == 100_000 - 943
  raw = np.loadtxt(f"{movielens_dir}/u.data", dtype=np.int64)
  order = np.lexsort((np.arange(len(raw)), raw[:, 3]))
  last = {str(u): str(i) for u, i in zip(raw[order, 0].tolist(), raw[order, 1].tolist())}
  assert all(last[u] == a for u, a in zip(test[schema.USER_ID], test[schema.AD_ID]))
  # The test example's history is the user's previous ratings, the most recent first.
  user = test[schema.USER_ID][0]
  previous = [str(i) for u, i in zip(raw[order, 0].tolist(), raw[order, 1].tolist()) if str(u) == user][:-1]
  expected = previous[::-1][: schema.HISTORY_LEN]
  assert list(test[schema.HIST_IDS][0][: len(expected)]) == expected
  # The default split is untouched.
  assert sum(len(b[schema.AD_ID]) for b in movielens.MovieLens100K(movielens_dir).examples("test")) == 20_000


def test_synthetic_leave_last_out_holds_out_each_users_last_click():
  config = synthetic.SyntheticConfig(**TINY_DATA.synthetic)
  data = synthetic.SyntheticSearchAds(config, split="leave_last_out")
  names = (schema.USER_ID, schema.AD_ID, schema.HIST_IDS, "day")
  train, test = _all(data, "train", names), _all(data, "test", names)
  assert len(test[schema.USER_ID]) == len(set(test[schema.USER_ID]))  # One test example per user...
  assert set(test[schema.USER_ID]) == set(train[schema.USER_ID]) | set(test[schema.USER_ID])  # ...per active user.
  default = synthetic.SyntheticSearchAds(config)
  total = sum(len(b[schema.AD_ID]) for split in ("train", "test") for b in default.examples(split))
  assert len(train[schema.AD_ID]) + len(test[schema.AD_ID]) == total
  # Nothing of a user's comes after their test click: it is the last of their train clicks' days too.
  last_train_day = {}
  for user, day in zip(train[schema.USER_ID], train["day"]):
    last_train_day[user] = max(day, last_train_day.get(user, -1))
  assert all(day >= last_train_day.get(user, -1) for user, day in zip(test[schema.USER_ID], test["day"]))
  # Its history is the user's whole past (up to the history length).
  user = test[schema.USER_ID][0]
  clicks = [a for u, a in zip(train[schema.USER_ID], train[schema.AD_ID]) if u == user]
  expected = clicks[::-1][: schema.HISTORY_LEN]
  assert list(test[schema.HIST_IDS][0][: len(expected)]) == expected


def test_held_out_items_never_reach_training_but_stay_in_the_catalog_and_test():
  spec = dataclasses.replace(TINY_DATA, held_out_item_fraction=0.1)
  source = sources.open_source(spec)
  assert isinstance(source, cold_start.HeldOutItems)
  held = set(source.features(np.flatnonzero(source.held_out_rows))[schema.AD_ID])
  assert 0.07 < len(held) / source.num_items < 0.13
  train = _all(source, "train")
  assert not held & set(train[schema.AD_ID])
  assert not held & set(train[schema.HIST_IDS].ravel())
  # Scrubbed histories stay left-aligned: no padding before a real entry.
  hist = train[schema.HIST_IDS] != schema.PAD
  assert np.all(hist[:, :-1] | ~hist[:, 1:])
  test = _all(source, "test")
  assert held & set(test[schema.AD_ID])
  unwrapped = sources.open_source(TINY_DATA)
  assert len(test[schema.AD_ID]) == sum(len(b[schema.AD_ID]) for b in unwrapped.examples("test"))


def test_movielens_held_out_movies_leave_no_trace_in_training_queries(movielens_dir):
  spec = sources.DataSpec(name="movielens", data_dir=movielens_dir, held_out_item_fraction=0.1)
  source = sources.open_source(spec)
  held = set(source.features(np.flatnonzero(source.held_out_rows))[schema.AD_ID])
  train, test = _all(source, "train"), _all(source, "test")
  assert len(test[schema.AD_ID]) == 20_000 and held & set(test[schema.AD_ID])
  assert not held & (set(train[schema.AD_ID]) | set(train[schema.HIST_IDS].ravel()))
  # MovieLens' query is the latest rated movie: never a held-out one.
  assert not {f"item:{i}" for i in held} & set(train[schema.QUERY_TOKENS].ravel())


def test_validation_is_the_most_recent_slice_of_training():
  examples = tf.data.Dataset.range(100).map(lambda i: {schema.AD_ID: i})
  config = train.TrainConfig(validation_fraction=0.1, max_validation_examples=5, batch_size=8)
  kept, validation = train._split_validation(examples, config)
  assert [int(x[schema.AD_ID]) for x in kept] == list(range(90))
  assert [int(i) for i in np.concatenate([b[schema.AD_ID] for b in validation])] == [90, 92, 94, 96, 98]
  with pytest.raises(ValueError, match="leaves no"):
    train._split_validation(examples, train.TrainConfig(validation_fraction=0.001, batch_size=8))


def test_movielens_time_split_holds_out_the_last_tenth_of_ratings(movielens_dir):
  data = movielens.MovieLens100K(movielens_dir, split="time")
  names = (schema.USER_ID, schema.AD_ID, schema.HIST_IDS)
  train_split, test = _all(data, "train", names), _all(data, "test", names)
  assert len(train_split[schema.AD_ID]) == 90_000 and len(test[schema.AD_ID]) == 10_000
  raw = np.loadtxt(f"{movielens_dir}/u.data", dtype=np.int64)
  order = np.lexsort((np.arange(len(raw)), raw[:, 3]))
  events = [(str(u), str(i)) for u, i in zip(raw[order, 0].tolist(), raw[order, 1].tolist())]
  assert list(zip(test[schema.USER_ID], test[schema.AD_ID])) == events[90_000:]
  # A test rating's sequence is everything its user rated before it, earlier test ratings included.
  user, position = test[schema.USER_ID][-1], len(events) - 1
  previous = [item for u, item in events[:position] if u == user][::-1][: schema.HISTORY_LEN]
  assert list(test[schema.HIST_IDS][-1][: len(previous)]) == previous
