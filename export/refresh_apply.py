"""The catalog after a delta: changed rows re-embedded in place, new ads appended, removed rows dropped."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from engine import base
from export import refresh_delta, refresh_state


def apply_delta(
  state: refresh_state.CatalogState,
  row_of: dict[str, int],
  delta: refresh_delta.CatalogDelta,
  embed: Callable[[dict[str, np.ndarray]], np.ndarray],
) -> tuple[refresh_state.CatalogState, dict[str, int], np.ndarray]:
  """The catalog after `delta`: changed rows re-embedded in place, new ads appended, removed rows dropped.

  Returns:
    The new state; counts (added, changed, removed, removals of unknown ads ignored, status changes);
    and int64 [N'] source rows: the row of `state` each new row copies unchanged, -1 where it was
    embedded anew (new and changed ads), which lets an index reuse what it computed for the rest.
  """
  delta.check_against(row_of)
  eligible = apply_statuses(state.eligible, row_of, delta.statuses)
  upsert_ids, features = delta.item_features()
  upsert_rows = np.asarray([row_of.get(ad_id, -1) for ad_id in upsert_ids], dtype=np.int64)
  upsert_active = np.asarray([delta.upserts[ad_id].status == "active" for ad_id in upsert_ids], dtype=bool)
  upsert_embeddings = embed(features) if upsert_ids else np.zeros([0, state.embeddings.shape[1]], np.float32)
  base.check_finite_embeddings(upsert_embeddings, upsert_ids)  # Refused here, naming the ads, before any rebuild.
  changed = upsert_rows >= 0
  eligible[upsert_rows[changed]] = upsert_active[changed]
  removed_rows = [row_of[ad_id] for ad_id in delta.removals if ad_id in row_of]
  keep = np.ones(len(state.ids), dtype=bool)
  keep[removed_rows] = False
  # One pass over the (memory-mapped) rows: kept rows, then new ads; changed rows are overwritten in place.
  new_row = np.cumsum(keep) - 1
  num_kept = int(keep.sum())
  num_added = int((~changed).sum())
  embeddings = np.empty([num_kept + num_added, state.embeddings.shape[1]], np.float32)
  np.compress(keep, state.embeddings, axis=0, out=embeddings[:num_kept])
  embeddings[new_row[upsert_rows[changed]]] = upsert_embeddings[changed]
  embeddings[num_kept:] = upsert_embeddings[~changed]
  source_rows = np.concatenate([np.flatnonzero(keep), np.full([num_added], -1, np.int64)])
  source_rows[new_row[upsert_rows[changed]]] = -1
  new_state = refresh_state.CatalogState(
    ids=np.concatenate([state.ids[keep], np.asarray(upsert_ids, dtype=object)[~changed]]),
    embeddings=embeddings,
    eligible=np.concatenate([eligible[keep], upsert_active[~changed]]),
  )
  counts = {
    "added": num_added,
    "changed": int(changed.sum()),
    "removed": len(removed_rows),
    "ignored_removals": len(delta.removals) - len(removed_rows),
    "status_changes": len(delta.statuses),
  }
  return new_state, counts, source_rows


@dataclasses.dataclass(frozen=True)
class StatusChange:
  """A delta that embeds, adds and drops no row: it sets statuses, and may name ads already gone.

  Attributes:
    eligible: the bool [N] eligibility mask after the delta.
    changed: whether that mask differs from the catalog's (False: publishing it would change nothing).
    counts: the report's `delta` entry.
  """

  eligible: np.ndarray
  changed: bool
  counts: dict[str, int]


def status_change(
  eligible: np.ndarray, row_of: dict[str, int], delta: refresh_delta.CatalogDelta
) -> StatusChange | None:
  """`delta` as a status change of the catalog (`row_of`, `eligible`); None if it adds, changes or removes ads.

  Removing ads already gone (a delta applied twice) drops no row, so such removals do not make a rebuild.
  Raises ValueError for a status change of an ad the catalog lacks.
  """
  ignored_removals = sum(ad_id not in row_of for ad_id in delta.removals)
  if delta.upserts or ignored_removals < len(delta.removals):
    return None
  delta.check_against(row_of)
  after = apply_statuses(eligible, row_of, delta.statuses)
  counts = {"status_changes": len(delta.statuses), "ignored_removals": ignored_removals}
  return StatusChange(after, not np.array_equal(after, eligible), counts)


def apply_statuses(eligible: np.ndarray, row_of: dict[str, int], statuses: dict[str, str]) -> np.ndarray:
  """A copy of the bool [N] mask `eligible` with the ads of `statuses` active or paused."""
  eligible = eligible.copy()
  for ad_id, status in statuses.items():
    eligible[row_of[ad_id]] = status == "active"
  return eligible
