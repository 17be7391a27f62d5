"""A hard synthetic catalog: clustered, heavy-tailed cluster sizes, anisotropic noise, unit norm."""

from __future__ import annotations

import numpy as np


def synthetic_catalog(num_items: int, dim: int = 64, num_queries: int = 1000, num_clusters: int | None = None,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Returns (items [N, d], queries [Q, d]), float32 and L2-normalised.

  Uniform random vectors make every index look good (no structure) or bad (no neighbours). Real
  item embeddings are clustered with a few huge clusters and a long tail, and spread unevenly across
  directions. So cluster sizes follow a Zipf-like law, each cluster gets its own random low-rank-ish
  covariance (eigenvalues decaying as 1/i), and cluster spreads vary. Queries come from the same
  mixture but pick clusters uniformly (a query tower does not follow item popularity) and carry
  more noise, so the query distribution is not the item distribution.

  Args:
    num_items: N.
    dim: d.
    num_queries: Q.
    num_clusters: number of mixture components; defaults to about N / 200 (at least 8).
    seed: random seed.
  """
  rng = np.random.default_rng(seed)
  num_clusters = num_clusters or max(8, num_items // 200)
  centers = rng.normal(size=[num_clusters, dim]).astype(np.float32)
  centers /= np.linalg.norm(centers, axis=1, keepdims=True)
  weights = 1.0 / np.arange(1, num_clusters + 1) ** 1.1
  weights /= weights.sum()
  spreads = rng.uniform(0.25, 0.6, size=num_clusters).astype(np.float32)
  # One shared set of random rotations, assigned to clusters round-robin, keeps generation fast at 1M.
  num_bases = min(num_clusters, 32)
  scales = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
  bases = np.stack([np.linalg.qr(rng.normal(size=[dim, dim]))[0].astype(np.float32) * scales[None, :]
                    for _ in range(num_bases)])

  def sample(assign: np.ndarray, noise_scale: float) -> np.ndarray:
    out = np.empty([assign.shape[0], dim], dtype=np.float32)
    chunk = 200_000
    for start in range(0, assign.shape[0], chunk):
      a = assign[start:start + chunk]
      z = rng.normal(size=[a.shape[0], dim]).astype(np.float32)
      noise = np.einsum("nd,nde->ne", z, bases[a % num_bases].transpose(0, 2, 1), optimize=True)
      x = centers[a] + noise * (spreads[a] * noise_scale)[:, None]
      out[start:start + chunk] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out

  items = sample(rng.choice(num_clusters, size=num_items, p=weights), 1.0)
  queries = sample(rng.integers(0, num_clusters, size=num_queries), 1.2)
  return items, queries
