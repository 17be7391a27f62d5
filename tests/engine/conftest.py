"""Shared fixtures for the engine tests: a small clustered catalog and its exact answers."""

import os
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from bench import catalog  # noqa: E402  (after the repository root is on sys.path)


@pytest.fixture(scope="session")
def small_catalog() -> tuple[np.ndarray, np.ndarray]:
  """5k x 32 clustered items and 64 queries."""
  return catalog.synthetic_catalog(5000, 32, num_queries=64, seed=1)


@pytest.fixture(scope="session")
def medium_catalog() -> tuple[np.ndarray, np.ndarray]:
  """30k x 32 clustered items (enough for partitioning and hashing) and 64 queries."""
  return catalog.synthetic_catalog(30000, 32, num_queries=64, seed=2)


@pytest.fixture(scope="session")
def medium_tuning_queries(medium_catalog) -> np.ndarray:
  """Held-out queries from the medium catalog's query distribution, for build-time tuning."""
  del medium_catalog  # Same generator and seed, different draw of queries only.
  return catalog.synthetic_catalog(30000, 32, num_queries=128, seed=2)[1][64:]
