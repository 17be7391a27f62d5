"""Opens a data source by name, from a spec that training records so export can reopen the catalog."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Protocol

import numpy as np

from models.data import logs, movielens, synthetic

SOURCES = ("synthetic", "movielens", "logs")


class Source(Protocol):
  """What every data source offers: an item table over its catalog and example batches."""

  num_items: int

  def features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    ...

  def row_of(self, ad_id: str) -> int:
    ...

  def examples(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    ...


@dataclasses.dataclass
class DataSpec:
  """Which data to read.

  Attributes:
    name: "synthetic", "movielens" or "logs".
    data_dir: directory of the MovieLens files or of items.jsonl/events.jsonl.
    synthetic: `SyntheticConfig` fields, for the synthetic source.
  """

  name: str = "synthetic"
  data_dir: str = ""
  synthetic: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> "DataSpec":
    return cls(**value)


def open_source(spec: DataSpec) -> Source:
  """Opens the source a spec names, with a clear error for a wrong name or a missing directory."""
  if spec.name == "synthetic":
    return synthetic.SyntheticSearchAds(synthetic.SyntheticConfig(**spec.synthetic))
  if spec.name in ("movielens", "logs") and not spec.data_dir:
    raise ValueError(f"--data={spec.name} needs --data_dir")
  if spec.name == "movielens":
    return movielens.MovieLens100K(spec.data_dir)
  if spec.name == "logs":
    return logs.LogsDataset(spec.data_dir)
  raise ValueError(f"Unknown data source {spec.name!r}; choose one of {SOURCES}")
