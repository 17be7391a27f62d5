"""Opens a data source by name, from a spec that training records so export can reopen the catalog."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from models.data import cold_start, logs, movielens, synthetic, tfrecord

SOURCES = ("synthetic", "movielens", "logs", "tfrecord")
SPLITS = ("default", "leave_last_out", "time")


class Source(Protocol):
  """What every data source offers: an item table over its catalog and example batches.

  A source with money in it also offers `bids(rows)`, float32 [n] bids of catalog rows (read them
  with `bids_of`, which answers None for a source without bids).
  """

  num_items: int

  def features(self, rows: np.ndarray) -> dict[str, np.ndarray]: ...

  def row_of(self, ad_id: str) -> int: ...

  def examples(self, split: str) -> Iterator[dict[str, np.ndarray]]: ...


def bids_of(source: Source, rows: np.ndarray) -> np.ndarray | None:
  """float32 [n] bids of catalog rows, or None when the source has none (MovieLens, logs without bids)."""
  bids = getattr(source, "bids", None)
  return None if bids is None else bids(rows)


@dataclasses.dataclass
class DataSpec:
  """Which data to read.

  Attributes:
    name: "synthetic", "movielens", "logs" or "tfrecord" (fgr-prepare's output).
    data_dir: directory of the MovieLens files, of items.jsonl/events.jsonl, or of fgr-prepare's shards.
    synthetic: `SyntheticConfig` fields, for the synthetic source.
    split: "default" (MovieLens: the TFRS tutorials' seeded 80/20 split; synthetic and logs: the
      last share of the log in time), "time" (the last share of the log in time, for every source;
      synthetic and logs split so by default) or "leave_last_out" (each user's last interaction is
      the test example; MovieLens and synthetic only).
    held_out_item_fraction: share of items removed from training entirely, to measure cold start
      (see `cold_start.HeldOutItems`); 0 keeps every item.
    held_out_item_seed: seed choosing those items.
  """

  name: str = "synthetic"
  data_dir: str = ""
  synthetic: dict[str, Any] = dataclasses.field(default_factory=dict)
  split: str = "default"
  held_out_item_fraction: float = 0.0
  held_out_item_seed: int = 0

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> DataSpec:
    return cls(**value)

  @classmethod
  def from_flags(cls, values: Any) -> DataSpec:
    """The spec fgr-train's and fgr-prepare's data flags (--data, --data_dir, --num_ads, ...) give.

    A relative local --data_dir is made absolute: the spec is recorded in the run's config.json, and
    fgr-export and fgr-eval reopen the data from wherever they are started.
    """
    if not 0.0 <= values.held_out_item_fraction < 1.0:
      raise ValueError(f"--held_out_item_fraction must be in [0, 1), got {values.held_out_item_fraction}")
    spec = cls(
      name=values.data,
      data_dir=_absolute(values.data_dir),
      split=values.split,
      held_out_item_fraction=values.held_out_item_fraction,
      held_out_item_seed=values.held_out_item_seed,
    )
    if values.data == "synthetic":
      spec.synthetic = {
        "num_ads": values.num_ads,
        "num_users": values.num_users,
        "num_sessions": values.num_sessions,
        "seed": values.data_seed,
      }
    return spec


def _absolute(data_dir: str) -> str:
  """A local path made absolute; "" and remote URLs (gs://, s3://, ...) as given."""
  if not data_dir or logs.is_remote(data_dir):
    return data_dir
  return os.path.abspath(data_dir)


def input_files(spec: DataSpec) -> list[str]:
  """The files a source's data is read from: none for the synthetic logs, which their config makes."""
  if spec.name == "movielens":
    return [os.path.join(spec.data_dir, name) for name in movielens.FILES]
  if spec.name == "logs":
    return [os.path.join(spec.data_dir, name) for name in (logs.ITEMS_FILE, logs.EVENTS_FILE)]
  return []


def open_source(spec: DataSpec) -> Source:
  """Opens the source a spec names, with a clear error for a wrong name or a missing directory."""
  if spec.split not in SPLITS:
    raise ValueError(f"Unknown split {spec.split!r}; choose one of {SPLITS}")
  source = _open(spec)
  if spec.held_out_item_fraction > 0:
    source = cold_start.HeldOutItems(source, spec.held_out_item_fraction, spec.held_out_item_seed)
  return source


def _open(spec: DataSpec) -> Source:
  # Synthetic logs and a user's logs are split by time by default, so "time" names that split.
  split = "default" if spec.split == "time" and spec.name != "movielens" else spec.split
  if spec.name == "synthetic":
    return synthetic.SyntheticSearchAds(synthetic.SyntheticConfig(**spec.synthetic), split=split)
  if spec.name in ("movielens", "logs", "tfrecord") and not spec.data_dir:
    raise ValueError(f"--data={spec.name} needs --data_dir")
  if spec.name == "movielens":
    # Its queries come from histories, so it builds them without the held-out items itself.
    return movielens.MovieLens100K(
      spec.data_dir,
      split=spec.split,
      held_out_fraction=spec.held_out_item_fraction,
      held_out_seed=spec.held_out_item_seed,
    )
  if spec.name == "logs":
    if split != "default":
      raise ValueError(f"--data=logs supports only its time-ordered split, not {spec.split!r}")
    return logs.LogsDataset(spec.data_dir)
  if spec.name == "tfrecord":
    if spec.split != "default" or spec.held_out_item_fraction > 0:
      raise ValueError("--data=tfrecord keeps the split and held-out items fgr-prepare was given; set them there")
    return tfrecord.TFRecordSource(spec.data_dir)
  raise ValueError(f"Unknown data source {spec.name!r}; choose one of {SOURCES}")
