"""Sampling-bias (logQ) correction and mixed negatives for the in-batch softmax.

In-batch negatives are the other positives of the batch, so an item is sampled as a negative in
proportion to its popularity: the softmax over-penalises popular items and under-trains the tail.
The logQ correction (Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations", RecSys 2019) subtracts log Q(item) from each logit, where Q is the probability of
the item being sampled. TFRS applies it through `candidate_sampling_probability`; this module
estimates Q from the training stream. Mixed negatives (Yang et al., WWW 2020) add items drawn
uniformly from the catalog, so the tail also appears as negatives; Q is then the mixture of both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow as tf

from models.data import schema

DEFAULT_FREQUENCY_BUCKETS = 1 << 20
NEGATIVE_PREFIX = "negative/"


class ItemFrequencies:
  """Counts of positives by hashed item id, accumulated one chunk at a time over the training stream.

  Memory is fixed (one counter per bucket) whatever the catalog or log size, and ids never seen get
  the smallest count, so their correction stays finite.

  Args:
    num_buckets: hash buckets; collisions only merge the counts of the colliding ids.
  """

  def __init__(self, num_buckets: int = DEFAULT_FREQUENCY_BUCKETS):
    self.num_buckets = num_buckets
    self.counts = np.zeros(num_buckets, dtype=np.int64)

  def bucket(self, ids: tf.Tensor) -> tf.Tensor:
    """Hash bucket of each string id (the same function in NumPy-fed counting and in the graph)."""
    return tf.strings.to_hash_bucket_fast(ids, self.num_buckets)

  def update(self, ids: np.ndarray) -> None:
    """Counts one chunk of positive item ids."""
    buckets = self.bucket(tf.constant(np.asarray(ids, dtype=object))).numpy()  # str is stored as UTF-8.
    self.counts += np.bincount(buckets, minlength=self.num_buckets)

  @property
  def total(self) -> int:
    return int(self.counts.sum())

  def probability_table(self) -> np.ndarray:
    """P(an in-batch candidate is this bucket's item), float32 [num_buckets]; unseen buckets count 1."""
    if self.total == 0:
      raise ValueError("No item was counted: is the training split empty?")
    return (np.maximum(self.counts, 1) / self.total).astype(np.float32)

  @classmethod
  def from_batches(
    cls, batches: Iterable[dict[str, np.ndarray]], num_buckets: int = DEFAULT_FREQUENCY_BUCKETS
  ) -> ItemFrequencies:
    """Counts the positives (`schema.AD_ID`) of a stream of example batches."""
    frequencies = cls(num_buckets)
    for batch in batches:
      frequencies.update(batch[schema.AD_ID])
    return frequencies


def mixture_probability(
  in_batch_probability: tf.Tensor, batch_size: tf.Tensor, num_uniform: int, num_items: int
) -> tf.Tensor:
  """Probability of a candidate under B in-batch (unigram) draws mixed with M uniform catalog draws.

  Every candidate, whichever way it was drawn, gets the same mixture probability
  (B * p_unigram + M / N) / (B + M), so its logit is corrected consistently.
  """
  batch_size = tf.cast(batch_size, tf.float32)
  return (batch_size * in_batch_probability + num_uniform / num_items) / (batch_size + float(num_uniform))


def uniform_negatives(
  table, num_negatives: int, seed: int, exclude: np.ndarray | None = None
) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of item features drawn uniformly from the catalog, keys prefixed "negative/".

  Args:
    table: the catalog (`sequences.ItemTable`).
    num_negatives: items per batch.
    seed: NumPy seed of the draws.
    exclude: optional bool [N] of rows never to draw (items held out of training).
  """
  rng = np.random.default_rng(seed)
  allowed = np.arange(table.num_items) if exclude is None else np.flatnonzero(~exclude)
  while True:
    rows = rng.choice(allowed, size=num_negatives, replace=True)
    features = table.features(rows)
    yield {NEGATIVE_PREFIX + name: features[name] for name in schema.ITEM_FEATURE_NAMES}
