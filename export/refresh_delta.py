"""Catalog deltas for fgr-refresh: new, changed and removed ads and status changes (docs/data_format.md).

A delta file is JSON Lines, one change per line, applied in order:

  {"ad_id": "a9", "category": "shoes", "brand": "acme", "tokens": ["trail"], "status": "active"}
      a new ad, or a changed one (re-embedded); the items.jsonl format.
  {"ad_id": "a3", "status": "paused"}
      a status change of an ad already in the catalog: only the eligibility mask changes.
  {"ad_id": "a7", "deleted": true}
      a removal.

A file is parsed and checked completely before anything is applied, so a bad file changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np

from models.data import logs, schema

STATUSES = logs.STATUSES
_AD_FIELDS = {"category", "brand", "tokens"}
_KNOWN_FIELDS = {"ad_id", "status", "deleted"} | _AD_FIELDS


@dataclasses.dataclass
class AdRecord:
  """An ad's features and status, as in items.jsonl."""

  category: str = ""
  brand: str = ""
  tokens: tuple[str, ...] = ()
  status: str = "active"


@dataclasses.dataclass
class CatalogDelta:
  """The net effect of one or more delta files, per ad id (later lines win).

  Attributes:
    upserts: new or changed ads, embedded again.
    statuses: status changes of ads already in the catalog.
    removals: ads to drop from the catalog.
  """

  upserts: dict[str, AdRecord] = dataclasses.field(default_factory=dict)
  statuses: dict[str, str] = dataclasses.field(default_factory=dict)
  removals: set[str] = dataclasses.field(default_factory=set)
  # Where each status change was read ("file:line"), for errors found only once the catalog is known.
  origins: dict[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __bool__(self) -> bool:
    return bool(self.upserts or self.statuses or self.removals)

  def counts(self) -> dict[str, int]:
    return {"upserts": len(self.upserts), "status_changes": len(self.statuses), "removals": len(self.removals)}

  def add_upsert(self, ad_id: str, record: AdRecord) -> None:
    self.statuses.pop(ad_id, None)
    self.removals.discard(ad_id)
    self.upserts[ad_id] = record

  def add_status(self, ad_id: str, status: str) -> None:
    if ad_id in self.removals:
      raise ValueError(f"status change of ad {ad_id!r}, which an earlier line removes")
    if ad_id in self.upserts:
      self.upserts[ad_id].status = status
    else:
      self.statuses[ad_id] = status

  def add_removal(self, ad_id: str) -> None:
    self.upserts.pop(ad_id, None)
    self.statuses.pop(ad_id, None)
    self.removals.add(ad_id)

  def merge(self, later: CatalogDelta) -> None:
    """Applies `later` on top of this delta, as if its lines followed ours."""
    for ad_id in later.removals:
      self.add_removal(ad_id)
    for ad_id, record in later.upserts.items():
      self.add_upsert(ad_id, dataclasses.replace(record))
    for ad_id, status in later.statuses.items():
      origin = later.origins.get(ad_id)
      try:
        self.add_status(ad_id, status)
      except ValueError as e:
        raise ValueError(f"{origin}: {e}" if origin else str(e)) from None
      if origin:
        self.origins[ad_id] = origin

  def check_against(self, known_ids: Collection[str]) -> None:
    """Raises ValueError if a status change names an ad that is neither known nor added here."""
    unknown = sorted(ad_id for ad_id in self.statuses if ad_id not in known_ids)
    if unknown:
      named = ", ".join(f"{a!r} ({self.origins[a]})" if a in self.origins else repr(a) for a in unknown[:5])
      raise ValueError(
        f"status changes for {len(unknown)} ads not in the catalog (give their features to add them): {named}"
      )

  def catalog_size_after(self, row_of: Collection[str]) -> int:
    """How many ads the catalog of `row_of`'s ids holds after this delta (removals of absent ads ignored)."""
    removed = sum(ad_id in row_of for ad_id in self.removals)
    return len(row_of) - removed + sum(ad_id not in row_of for ad_id in self.upserts)

  def item_features(self) -> tuple[list[str], dict[str, np.ndarray]]:
    """The upserted ads' ids and their item-tower inputs, in a stable order."""
    ids = sorted(self.upserts)
    records = [self.upserts[ad_id] for ad_id in ids]
    features = {
      schema.AD_ID: np.asarray(ids, dtype=object),
      schema.CATEGORY: np.asarray([r.category for r in records], dtype=object),
      schema.BRAND: np.asarray([r.brand for r in records], dtype=object),
      schema.AD_TOKENS: schema.pad_tokens([list(r.tokens) for r in records], schema.AD_TOKENS_LEN),
    }
    return ids, features


def _parse_record(record: Any) -> tuple[str, str, Any]:
  """Returns (kind, ad_id, payload) for one line; kind is "upsert", "status" or "removal"."""
  if not isinstance(record, dict):
    raise ValueError("expected a JSON object")
  ad_id = record.get("ad_id")
  if not isinstance(ad_id, str) or not ad_id:
    raise ValueError("'ad_id' must be a non-empty string")
  logs.check_length(ad_id, "ad_id")  # As items.jsonl: every version carries each id (the limit's why).
  unknown = set(record) - _KNOWN_FIELDS
  if unknown:
    raise ValueError(f"unknown fields {sorted(unknown)}")
  if "deleted" in record:
    if record["deleted"] is not True or set(record) != {"ad_id", "deleted"}:
      raise ValueError('a removal is exactly {"ad_id": ..., "deleted": true}')
    return "removal", ad_id, None
  status = record.get("status", "active")
  if status not in STATUSES:
    raise ValueError(f"'status' must be one of {STATUSES}, got {status!r}")
  if not _AD_FIELDS & set(record):
    if "status" not in record:
      raise ValueError("a line needs the ad's features, a 'status' or 'deleted': true")
    return "status", ad_id, status
  category, brand, tokens, status = logs.item_fields(record)  # The type rules of items.jsonl.
  return "upsert", ad_id, AdRecord(category, brand, tuple(tokens), status)


def parse_lines(lines: Iterable[str], name: str = "<delta>") -> CatalogDelta:
  """Parses delta lines (blank lines are skipped); errors name the file and line."""
  delta = CatalogDelta()
  for line_number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    record = logs.parse_json_object(line, f"{name}:{line_number}")  # Refused as an items.jsonl line is.
    try:
      kind, ad_id, payload = _parse_record(record)
      if kind == "upsert":
        delta.add_upsert(ad_id, payload)
      elif kind == "status":
        delta.add_status(ad_id, payload)
        delta.origins[ad_id] = f"{name}:{line_number}"
      else:
        delta.add_removal(ad_id)
    except ValueError as e:
      raise ValueError(f"{name}:{line_number}: {e}") from None
  return delta


def read_delta(path: str) -> CatalogDelta:
  """Reads and checks one delta file completely."""
  logs.check_file(path)
  return parse_lines((line for _, line in logs.text_lines(path)), path)
