"""A hard synthetic catalog: clustered, heavy-tailed cluster sizes, anisotropic noise, unit norm."""

from __future__ import annotations

import numpy as np


def synthetic_catalog(
  num_items: int,
  dim: int = 64,
  num_queries: int = 1000,
  num_clusters: int | None = None,
  noise: float = 0.5,
  seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Returns (items [N, d], queries [Q, d]), float32 and L2-normalised.

  Uniform random vectors make every index look good (no structure) or bad (no neighbours). Real
  item embeddings are clustered with a few huge clusters and a long tail, and spread unevenly across
  directions. So clusters group into topics, cluster sizes follow a Zipf-like law (exponent 0.9),
  each cluster gets its own random rotation of an anisotropic covariance (variances decaying as 1/i)
  and its own spread. Queries come from the same mixture with a flatter cluster popularity (square
  root of the item shares), so tail clusters are queried more often than they hold items.

  Args:
    num_items: N.
    dim: d.
    num_queries: Q.
    num_clusters: number of mixture components; defaults to about N / 200 (at least 8).
    noise: mean within-cluster spread (per-cluster spreads vary in [0.5, 1.5] x noise); the noise
      vector's norm is about 2.2 x spread before normalisation.
    seed: random seed.
  """
  rng = np.random.default_rng(seed)
  num_clusters = num_clusters or max(8, num_items // 200)
  # Two levels: topics (super-clusters) hold related clusters, so a tail cluster's neighbours sit
  # in nearby clusters, as in real embedding spaces, rather than in random directions.
  num_topics = max(2, int(np.sqrt(num_clusters)))
  topics = rng.normal(size=[num_topics, dim]).astype(np.float32)
  topics /= np.linalg.norm(topics, axis=1, keepdims=True)
  centers = topics[rng.integers(0, num_topics, size=num_clusters)] + (0.6 / np.sqrt(dim)) * rng.normal(
    size=[num_clusters, dim]
  ).astype(np.float32)
  centers /= np.linalg.norm(centers, axis=1, keepdims=True)
  weights = 1.0 / np.arange(1, num_clusters + 1) ** 0.9
  weights /= weights.sum()
  spreads = noise * rng.uniform(0.5, 1.5, size=num_clusters).astype(np.float32)
  # One shared set of random rotations, assigned to clusters round-robin, keeps generation fast at 1M.
  num_bases = min(num_clusters, 32)
  scales = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
  bases = np.stack(
    [np.linalg.qr(rng.normal(size=[dim, dim]))[0].astype(np.float32) * scales[None, :] for _ in range(num_bases)]
  )

  def sample(assign: np.ndarray, noise_scale: float) -> np.ndarray:
    out = np.empty([assign.shape[0], dim], dtype=np.float32)
    chunk = 200_000
    for start in range(0, assign.shape[0], chunk):
      a = assign[start : start + chunk]
      z = rng.normal(size=[a.shape[0], dim]).astype(np.float32)
      noise = np.einsum("nd,nde->ne", z, bases[a % num_bases].transpose(0, 2, 1), optimize=True)
      x = centers[a] + noise * (spreads[a] * noise_scale)[:, None]
      out[start : start + chunk] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out

  items = sample(rng.choice(num_clusters, size=num_items, p=weights), 1.0)
  query_weights = np.sqrt(weights) / np.sqrt(weights).sum()
  queries = sample(rng.choice(num_clusters, size=num_queries, p=query_weights), 1.0)
  return items, queries
