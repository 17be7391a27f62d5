"""An inverted-file index in stock TF ops: k-means partitions, score only the probed ones."""

from __future__ import annotations

import math
import time

import numpy as np
import tensorflow as tf
from absl import logging

from engine import base, kmeans, search_ops


class PartitionedIndex(base.Index):
  """Items grouped by nearest k-means centroid; a query scores only its `probes` best partitions.

  Every op is a stock TensorFlow op (matmul, top_k, gather, ragged range), so a SavedModel holding
  this index loads in stock TF Serving with no custom op library and no XLA flag. Items are stored
  sorted by partition, so a partition is a contiguous slice `[offsets[p], offsets[p + 1])`; the
  probed slices are gathered and scored exactly in float32. Ineligible items are masked among the
  probed ones, and a query left with fewer than k eligible items falls back to an exact masked
  search (inside a `tf.cond`).

  Args:
    embeddings: float32 [N, d] item embeddings.
    centroids: float32 [P, d] partition centroids.
    assignment: int32 [N] partition of each item.
    probes: default number of partitions scored per query.
    eligible: optional bool [N] mask.
  """

  def __init__(
    self,
    embeddings: np.ndarray,
    centroids: np.ndarray,
    assignment: np.ndarray,
    probes: int,
    eligible: np.ndarray | None = None,
    name: str = "partitioned",
  ):
    super().__init__(embeddings.shape[0], eligible, name=name)
    order = np.argsort(assignment, kind="stable").astype(np.int32)
    counts = np.bincount(assignment, minlength=centroids.shape[0])
    self.centroids = tf.Variable(centroids.astype(np.float32), trainable=False, name="centroids")
    self.vectors = tf.Variable(embeddings[order], trainable=False, name="vectors")
    self.row_ids = tf.Variable(order, trainable=False, name="row_ids")
    self.offsets = tf.Variable(
      np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), trainable=False, name="offsets"
    )
    self._probes = int(min(probes, centroids.shape[0]))

  @property
  def num_partitions(self) -> int:
    return int(self.centroids.shape[0])

  @property
  def default_probes(self) -> int:
    """Partitions scored when a request does not set `probes`."""
    return self._probes

  @default_probes.setter
  def default_probes(self, probes: int) -> None:
    self._probes = int(min(max(1, probes), self.num_partitions))

  def search(self, queries: tf.Tensor, k: int, probes: tf.Tensor | None = None) -> base.SearchResult:
    """Exact scores over the probed partitions; `probes` 0 (or omitted) uses the built default.

    A negative `probes` fails the request (InvalidArgument, naming the knob); more than the partitions
    scores them all.
    """
    k = min(k, self.num_items)
    queries = tf.cast(queries, tf.float32)
    probes = search_ops.checked_option(
      probes,
      self._probes,
      "probes",
      1,
      None,
      f"0 (the built default, {self._probes}) or positive (capped at the {self.num_partitions} partitions)",
    )
    probes = tf.minimum(probes, self.num_partitions)
    _, parts = tf.math.top_k(tf.matmul(queries, self.centroids, transpose_b=True), k=probes)  # [B, probes]

    def search_one(args: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
      query, query_parts = args
      positions = tf.ragged.range(
        tf.gather(self.offsets, query_parts), tf.gather(self.offsets, query_parts + 1)
      ).flat_values
      scores = tf.linalg.matvec(tf.gather(self.vectors, positions), query)
      rows = tf.gather(self.row_ids, positions)
      top = search_ops.top_k_of_candidates(scores[tf.newaxis], rows[tf.newaxis], self.eligible, k)
      return top.scores[0], top.indices[0]

    scores, rows = tf.map_fn(
      search_one,
      (queries, parts),
      parallel_iterations=2,
      fn_output_signature=(tf.TensorSpec([k], tf.float32), tf.TensorSpec([k], tf.int32)),
    )
    return search_ops.fill_short_rows(base.SearchResult(scores, rows), k, lambda: self._exact(queries, k))

  def _exact(self, queries: tf.Tensor, k: int) -> base.SearchResult:
    """Masked exact search over the partition-sorted vectors, mapped back to catalog rows."""
    sorted_eligible = tf.gather(self.eligible, self.row_ids)
    result = search_ops.exact_search(queries, self.vectors, sorted_eligible, k)
    rows = tf.gather(self.row_ids, tf.maximum(result.indices, 0))
    return base.finalize(result.scores, rows)

  def search_option_specs(self) -> dict[str, tf.TensorSpec]:
    return {"probes": tf.TensorSpec([], tf.int32, name="probes")}

  def nbytes(self) -> int:
    return sum(int(v.numpy().nbytes) for v in (self.centroids, self.vectors, self.row_ids, self.offsets))


def check_options(
  num_items: int,
  k: int,
  *,
  num_partitions: int | None,
  probes: int | None,
  target_recall: float,
  num_tuning_queries: int,
  kmeans_iterations: int,
  training_sample_size: int,
  seed: int = 0,
  **unchecked: object,
) -> int:
  """Raises ValueError naming the first option `build_partitioned` refuses for `num_items` ads; returns
  the number of partitions (derived when not given). Also fgr-export's check before it embeds the catalog."""
  del k, unchecked
  base.check_option("seed", seed, 0)
  base.check_option(
    "num_partitions",
    num_partitions or 0,
    0,
    num_items,
    valid=f"0 (about sqrt(N)) or 1 to {num_items}, the number of ads",
  )
  given_partitions = bool(num_partitions)
  num_partitions = num_partitions or max(1, int(round(math.sqrt(num_items))))
  # Above a num_partitions given with it, probes is a contradiction; above the derived one (which the
  # caller may not know, and which a refresh's smaller catalog lowers) it scores every partition.
  base.check_option(
    "probes",
    probes or 0,
    0,
    num_partitions if given_partitions else None,
    valid="0 (tuned for target_recall) or positive"
    + (f", at most num_partitions ({num_partitions})" if given_partitions else ""),
  )
  base.check_option("target_recall", target_recall, 0, 1, integer=False)
  base.check_option("num_tuning_queries", num_tuning_queries, 1)
  base.check_option("kmeans_iterations", kmeans_iterations, 0)
  base.check_option(
    "training_sample_size",
    training_sample_size,
    num_partitions,
    valid=f"at least num_partitions ({num_partitions}): k-means picks its initial centroids from the sample",
  )
  return num_partitions


def build_partitioned(
  embeddings: np.ndarray,
  *,
  k: int,
  eligible: np.ndarray | None = None,
  num_partitions: int | None = None,
  probes: int | None = None,
  target_recall: float = 0.95,
  tuning_queries: np.ndarray | None = None,
  num_tuning_queries: int = 200,
  kmeans_iterations: int = 12,
  training_sample_size: int = 200_000,
  seed: int = 0,
) -> PartitionedIndex:
  """Builds the partitioned index; probes are tuned for `target_recall` unless given.

  Args:
    embeddings: float32 [N, d].
    k: the default number of neighbours.
    eligible: optional bool [N] mask.
    num_partitions: k-means centroids, 1 to N; about sqrt(N) when omitted or 0.
    probes: partitions scored per query by default; tuned on tuning queries when omitted or 0. At most
      `num_partitions` when that is given; above the derived one, every partition is scored.
    target_recall: recall@k the tuned probes reach on the tuning queries (plus 0.01 margin).
    tuning_queries: float32 [Q, d]; catalog rows stand in when omitted.
    num_tuning_queries: catalog rows used when `tuning_queries` is omitted.
    kmeans_iterations: Lloyd iterations.
    training_sample_size: points k-means trains on, at least `num_partitions`.
    seed: random seed.
  """
  start = time.perf_counter()
  num_items = embeddings.shape[0]
  # Refused before k-means trains, naming the option; 0 means what omitting it does, as for ScaNN's knobs.
  num_partitions = check_options(
    num_items,
    k,
    num_partitions=num_partitions,
    probes=probes,
    target_recall=target_recall,
    num_tuning_queries=num_tuning_queries,
    kmeans_iterations=kmeans_iterations,
    training_sample_size=training_sample_size,
  )
  centroids, assignment = kmeans.spherical_kmeans(
    embeddings, num_partitions, iterations=kmeans_iterations, sample_size=training_sample_size, seed=seed
  )
  index = PartitionedIndex(embeddings, centroids, assignment, probes or 1, eligible)
  if not probes:
    queries = search_ops.tuning_queries_or_sample(embeddings, tuning_queries, num_tuning_queries, seed)
    ladder = sorted(
      {
        max(1, int(round(num_partitions * f)))
        for f in (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
      }
    )
    index.default_probes, recall = search_ops.tune_search_option(
      index, "probes", ladder, embeddings, queries, k, target_recall
    )
    logging.info(
      "partitioned: %d partitions, tuned probes=%d (recall@%d %.3f on tuning queries) in %.1fs",
      num_partitions,
      index.default_probes,
      k,
      recall,
      time.perf_counter() - start,
    )
  return index


BACKEND = base.Backend("partitioned", build_partitioned, check_options)
