"""Spherical k-means in TensorFlow, for the stock-op partitioned index."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from absl import logging


def _assign(points: tf.Tensor, centroids: tf.Tensor, chunk: int = 65_536) -> tf.Tensor:
  """Index of the highest-dot-product centroid for each point, in chunks to bound memory."""
  parts = []
  for start in range(0, int(points.shape[0]), chunk):
    parts.append(
      tf.argmax(tf.matmul(points[start : start + chunk], centroids, transpose_b=True), axis=1, output_type=tf.int32)
    )
  return tf.concat(parts, 0)


def spherical_kmeans(
  points: np.ndarray, num_clusters: int, iterations: int = 12, sample_size: int = 200_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Trains unit-norm centroids on a sample and assigns every point to its best centroid.

  Hand-written because the pinned stack has no k-means: TF 2.20 dropped the estimator KMeans,
  scikit-learn and Faiss are not dependencies, and ScaNN's partitioner would make building this
  index require ScaNN. Lloyd iterations are a matmul, an argmax and a `unsorted_segment_sum`;
  assignment by dot product matches how queries probe partitions (maximum inner product). Empty
  clusters are re-seeded from random sample points.

  Args:
    points: float32 [N, d].
    num_clusters: number of centroids.
    iterations: Lloyd iterations on the sample.
    sample_size: points used for training.
    seed: random seed.

  Returns:
    (centroids float32 [num_clusters, d], assignment int32 [N]).
  """
  rng = np.random.default_rng(seed)
  sample = points[rng.choice(points.shape[0], min(sample_size, points.shape[0]), replace=False)]
  sample_t = tf.constant(sample)
  centroids = tf.constant(sample[rng.choice(sample.shape[0], num_clusters, replace=False)])
  for i in range(iterations):
    assignment = _assign(sample_t, centroids)
    sums = tf.math.unsorted_segment_sum(sample_t, assignment, num_clusters)
    counts = tf.math.bincount(assignment, minlength=num_clusters, maxlength=num_clusters)
    empty = counts == 0
    reseed = tf.constant(sample[rng.choice(sample.shape[0], num_clusters)])
    sums = tf.where(empty[:, tf.newaxis], reseed, sums)
    centroids = tf.math.l2_normalize(sums, axis=1)
    logging.log_every_n(
      logging.INFO, "k-means iteration %d: %d empty clusters", 4, i, int(tf.reduce_sum(tf.cast(empty, tf.int32)))
    )
  return centroids.numpy(), _assign(tf.constant(points), centroids).numpy()
