"""The synthetic search-ads log: determinism, streaming, and the properties the issue asks for."""

import collections

import numpy as np

from models.data import schema, synthetic

SMALL = synthetic.SyntheticConfig(num_ads=5000, num_users=500, num_sessions=3000, seed=3)


def _concat(batches):
  batches = list(batches)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_same_seed_same_log_whatever_the_chunking():
  data = synthetic.SyntheticSearchAds(SMALL)
  a = _concat(data.examples("train", chunk_sessions=1000))
  b = _concat(synthetic.SyntheticSearchAds(SMALL).examples("train", chunk_sessions=377))
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  other = _concat(
    synthetic.SyntheticSearchAds(synthetic.SyntheticConfig(**{**SMALL.__dict__, "seed": 4})).examples("train")
  )
  assert not np.array_equal(a[schema.AD_ID][:100], other[schema.AD_ID][:100])


def test_catalog_of_ten_million_ads_is_addressable_without_materialising_it():
  data = synthetic.SyntheticSearchAds(synthetic.SyntheticConfig(num_ads=10_000_000))
  rows = np.array([0, 4_999_999, 9_999_999])
  features = data.features(rows)
  assert list(features[schema.AD_ID]) == ["ad0", "ad4999999", "ad9999999"]
  assert data.row_of("ad9999999") == 9_999_999
  np.testing.assert_array_equal(data.features(rows)[schema.AD_TOKENS], features[schema.AD_TOKENS])


def test_clicks_fit_the_query_and_respect_status_and_creation_day():
  data = synthetic.SyntheticSearchAds(SMALL)
  examples = _concat(list(data.examples("train")) + list(data.examples("test")))
  rows = np.array([data.row_of(a) for a in examples[schema.AD_ID]])
  assert not data.is_paused(rows).any()
  assert np.all(data.created_day(rows) <= examples["day"])
  # Every query shares the category of the session's first click, so most clicks match it.
  query_category = [next(t for t in q if t.startswith("t")).split("_")[0][1:] for q in examples[schema.QUERY_TOKENS]]
  matches = np.mean([f"c{c}" == cat for c, cat in zip(query_category, examples[schema.CATEGORY])])
  assert matches > 0.95
  assert 0.01 < examples["converted"].mean() < 0.2


def test_popularity_is_zipf_like_with_a_long_tail_and_late_ads():
  data = synthetic.SyntheticSearchAds(SMALL)
  counts = collections.Counter(_concat(data.examples("train"))[schema.AD_ID])
  top = sum(c for _, c in counts.most_common(len(counts) // 10))
  assert top / sum(counts.values()) > 0.4  # the head
  assert sum(1 for c in counts.values() if c == 1) > 100  # the tail
  late = data.created_day(np.arange(SMALL.num_ads)) > 0
  assert 0.02 < late.mean() < 0.1


def test_behaviour_sequences_hold_only_earlier_clicks_of_the_same_user():
  data = synthetic.SyntheticSearchAds(SMALL)
  examples = _concat(data.examples("train"))
  seen = collections.defaultdict(list)
  for user, ad_id, hist in zip(examples[schema.USER_ID], examples[schema.AD_ID], examples[schema.HIST_IDS]):
    expected = list(reversed(seen[user]))[: schema.HISTORY_LEN]
    assert [h for h in hist if h] == expected
    seen[user].append(ad_id)


def test_bids_are_deterministic_positive_and_heavy_tailed():
  data = synthetic.SyntheticSearchAds(SMALL)
  bids = data.bids(np.arange(SMALL.num_ads))
  assert bids.dtype == np.float32 and bids.shape == (SMALL.num_ads,) and np.all(bids > 0)
  rows = np.array([4999, 17, 0])
  np.testing.assert_array_equal(synthetic.SyntheticSearchAds(SMALL).bids(rows), bids[rows])  # Any slice, any order.
  other = synthetic.SyntheticSearchAds(synthetic.SyntheticConfig(**{**SMALL.__dict__, "seed": 4}))
  assert not np.array_equal(other.bids(rows), bids[rows])
  top = np.sort(bids)[::-1][: SMALL.num_ads // 100]
  assert top.sum() / bids.sum() > 0.05  # The top 1% of ads hold well over 1% of the value.


def test_examples_carry_the_clicked_ads_bid_and_the_querys_category():
  data = synthetic.SyntheticSearchAds(SMALL)
  examples = _concat(data.examples("test"))
  rows = np.array([data.row_of(a) for a in examples[schema.AD_ID]])
  assert examples["bid"].dtype == np.float32 and examples["query_category"].dtype == object
  np.testing.assert_array_equal(examples["bid"], data.bids(rows))
  np.testing.assert_array_equal(examples["query_category"], examples[schema.CATEGORY])
  assert examples["converted"].mean() < 0.2  # Conversions stay much rarer than clicks.
