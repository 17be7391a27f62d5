"""Held-out query features of a data source: for warm-up records, recall checks and load tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from models.data import schema


class _ExampleSource(Protocol):
  def examples(self, split: str) -> Iterator[dict[str, np.ndarray]]: ...


def held_out_examples(source: _ExampleSource, count: int) -> dict[str, np.ndarray]:
  """Every field the batches share, of up to `count` held-out examples (the test split's first batches)."""
  parts = []
  total = 0
  for batch in source.examples("test"):
    parts.append(batch)
    total += len(batch[schema.USER_ID])
    if total >= count:
      break
  if not parts:
    raise ValueError("The data source has no test examples to sample queries from")
  names = [name for name in parts[0] if all(name in part for part in parts)]
  return {name: np.concatenate([p[name] for p in parts])[:count] for name in names}


def held_out_queries(source: _ExampleSource, count: int) -> dict[str, np.ndarray]:
  """Query features of up to `count` held-out examples (the test split's first batches)."""
  examples = held_out_examples(source, count)
  return {name: examples[name] for name in schema.QUERY_FEATURE_NAMES}
