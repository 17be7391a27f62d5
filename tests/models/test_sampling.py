"""logQ correction and mixed negatives against a NumPy reference of the corrected in-batch softmax."""

import numpy as np
import pytest
import tensorflow as tf

from models import retrieval, sampling
from models.data import schema
from tests.conftest import TINY_TOWER

_MIN_FLOAT = np.finfo(np.float32).min / 100.0  # TFRS' accidental-hit penalty.


def _batch(ad_ids, prefix=""):
  n = len(ad_ids)
  batch = {
    prefix + schema.AD_ID: tf.constant(ad_ids),
    prefix + schema.CATEGORY: tf.constant([f"c{i % 2}" for i in range(n)]),
    prefix + schema.BRAND: tf.constant([f"b{i}" for i in range(n)]),
    prefix + schema.AD_TOKENS: tf.constant([[f"t{i}", ""] for i in range(n)]),
  }
  if not prefix:
    batch.update(
      {
        schema.USER_ID: tf.constant([f"u{i}" for i in range(n)]),
        schema.USER_FEATURES: tf.constant([["age:18-24"]] * n),
        schema.QUERY_TOKENS: tf.constant([[f"t{i}", "t9"] for i in range(n)]),
        schema.HIST_IDS: tf.constant([["ad1", ""]] * n),
        schema.HIST_CATEGORIES: tf.constant([["c1", ""]] * n),
        schema.HIST_BRANDS: tf.constant([["b1", ""]] * n),
      }
    )
  return batch


def _reference_loss(queries, candidates, candidate_ids, probabilities, temperature):
  """Sum over queries of the softmax cross-entropy of logits q.c / T - log Q, accidental hits removed."""
  logits = queries @ candidates.T / temperature - np.log(probabilities)[np.newaxis, :]
  loss = 0.0
  for i in range(len(queries)):
    row = logits[i].copy()
    duplicate = np.asarray(candidate_ids) == candidate_ids[i]
    duplicate[i] = False
    row[duplicate] += _MIN_FLOAT
    row -= row.max()
    loss += -(row[i] - np.log(np.exp(row).sum()))
  return loss


def test_item_frequencies_count_a_stream_by_hashed_id():
  frequencies = sampling.ItemFrequencies.from_batches(
    [{schema.AD_ID: np.array(["a", "b", "a"], dtype=object)}, {schema.AD_ID: np.array(["a"], dtype=object)}],
    num_buckets=1 << 16,
  )
  table = frequencies.probability_table()
  buckets = frequencies.bucket(tf.constant(["a", "b", "never-seen"])).numpy()
  np.testing.assert_allclose(table[buckets], [3 / 4, 1 / 4, 1 / 4])  # Unseen ids count as one.
  assert frequencies.total == 4


def test_logq_corrected_loss_matches_numpy():
  ids = ["ad1", "ad2", "ad1", "ad3"]  # ad1 twice: an accidental hit for rows 0 and 2.
  counts = {"ad1": 50, "ad2": 5, "ad3": 1}
  frequencies = sampling.ItemFrequencies.from_batches(
    [{schema.AD_ID: np.array([ad for ad, c in counts.items() for _ in range(c)], dtype=object)}]
  )
  model = retrieval.RetrievalModel(TINY_TOWER)
  model.set_sampling(frequencies)
  batch = _batch(ids)
  loss = float(model.compute_loss(batch).numpy())

  queries, candidates = model.query_tower(batch).numpy(), model.item_tower(batch).numpy()
  probabilities = np.array([counts[i] / 56 for i in ids])
  expected = _reference_loss(queries, candidates, ids, probabilities, TINY_TOWER.temperature)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  # The correction matters: without it the loss differs.
  assert abs(expected - _reference_loss(queries, candidates, ids, np.ones(4), TINY_TOWER.temperature)) > 1e-3


@pytest.mark.parametrize("logq", [True, False])
def test_mixed_negatives_join_the_candidates_with_the_mixture_probability(logq):
  ids, negative_ids = ["ad1", "ad2", "ad3"], ["ad7", "ad2"]  # ad2 sampled again: an accidental hit.
  counts = {"ad1": 6, "ad2": 3, "ad3": 1}
  frequencies = sampling.ItemFrequencies.from_batches(
    [{schema.AD_ID: np.array([ad for ad, c in counts.items() for _ in range(c)], dtype=object)}]
  )
  num_items = 40
  model = retrieval.RetrievalModel(TINY_TOWER)
  model.set_sampling(frequencies if logq else None, num_negatives=2, num_items=num_items)
  batch = {**_batch(ids), **_batch(negative_ids, prefix=sampling.NEGATIVE_PREFIX)}
  loss = float(model.compute_loss(batch).numpy())

  negatives = {name: batch[sampling.NEGATIVE_PREFIX + name] for name in schema.ITEM_FEATURE_NAMES}
  queries = model.query_tower(batch).numpy()
  candidates = np.concatenate([model.item_tower(batch).numpy(), model.item_tower(negatives).numpy()])
  all_ids = ids + negative_ids
  if logq:
    unigram = np.array([max(counts.get(i, 0), 1) / 10 for i in all_ids])
    probabilities = (3 * unigram + 2 / num_items) / 5
  else:
    probabilities = np.ones(len(all_ids))
  expected = _reference_loss(queries, candidates, all_ids, probabilities, TINY_TOWER.temperature)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_uniform_negatives_never_draw_held_out_items():
  class Table:
    num_items = 10

    def features(self, rows):
      return {
        schema.AD_ID: np.array([f"ad{r}" for r in rows], dtype=object),
        schema.CATEGORY: np.array(["c"] * len(rows), dtype=object),
        schema.BRAND: np.array(["b"] * len(rows), dtype=object),
        schema.AD_TOKENS: np.full([len(rows), 2], "", dtype=object),
      }

  exclude = np.arange(10) >= 3
  draws = sampling.uniform_negatives(Table(), 50, seed=0, exclude=exclude)
  seen = set(next(draws)[sampling.NEGATIVE_PREFIX + schema.AD_ID]) | set(
    next(draws)[sampling.NEGATIVE_PREFIX + schema.AD_ID]
  )
  assert seen == {"ad0", "ad1", "ad2"}
