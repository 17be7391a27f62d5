"""Continuous refresh: publishes the catalog delta files dropped into a directory, on a schedule.

Each poll takes every `*.jsonl` file in the directory (names starting with "." are ignored, so a
writer can create `.name.jsonl` and rename it when complete), in name order. A file that does not
parse, or that contradicts the catalog (a status change for an unknown ad), is moved to `failed/`
with a `.error` note and nothing of it is applied. The good files are merged and published as one
version; then they move to `processed/`, prefixed with that version. If publishing fails, they stay
where they are and the next poll tries again (re-applying a delta is harmless: every change in it
is idempotent), unless the catalog they make cannot be published at all (fewer ads than k): then
each is published alone and the one that cannot be goes to `failed/`. A file that changed while it
was applied (its writer is still writing) stays for the next poll; a name already in `failed/` or
`processed/` gets a -2, -3... suffix. A poll with no files publishes the refresher's finished
background retrain, if any.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from absl import logging

from export import refresh, refresh_delta

PROCESSED_DIR = "processed"
FAILED_DIR = "failed"
SUFFIX = ".jsonl"


@dataclasses.dataclass
class PollResult:
  """What one poll did."""

  accepted: list[str] = dataclasses.field(default_factory=list)
  rejected: dict[str, str] = dataclasses.field(default_factory=dict)
  report: dict[str, Any] | None = None


def pending_files(directory: str) -> list[str]:
  """Delta files waiting in `directory`, in name order."""
  return sorted(
    name
    for name in os.listdir(directory)
    if name.endswith(SUFFIX) and not name.startswith(".") and os.path.isfile(os.path.join(directory, name))
  )


def _move(directory: str, name: str, subdirectory: str, new_name: str) -> str:
  """Moves a delta file into `subdirectory`; a name taken there by an earlier file gets a -2, -3... suffix."""
  target_dir = os.path.join(directory, subdirectory)
  os.makedirs(target_dir, exist_ok=True)
  stem, suffix = os.path.splitext(new_name)
  target, n = os.path.join(target_dir, new_name), 1
  while os.path.exists(target) or os.path.exists(target + ".error"):
    n += 1
    target = os.path.join(target_dir, f"{stem}-{n}{suffix}")
  os.replace(os.path.join(directory, name), target)
  return target


def _reject(directory: str, name: str, error: Exception, result: PollResult) -> None:
  """Moves a delta file to failed/ with a .error note; nothing of it is applied."""
  result.rejected[name] = str(error)
  target = _move(directory, name, FAILED_DIR, name)
  with open(target + ".error", "w") as f:
    f.write(f"{error}\n")
  logging.error("Rejected delta file %s (nothing of it applied; moved to %s): %s", name, target, error)


def _signature(path: str) -> tuple[int, int]:
  """(size, mtime) of a file: changed if its writer is still writing it."""
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns


def _still_as_read(directory: str, name: str, read_as: tuple[int, int]) -> bool:
  """Whether a file is as it was read; if not, it stays for the next poll (a writer not using a dot-name
  and a rename is still writing it: moving it now would cut its later lines off)."""
  try:
    if _signature(os.path.join(directory, name)) == read_as:
      return True
  except FileNotFoundError:
    logging.warning("Delta file %s was removed while it was being applied", name)
    return False
  logging.warning("Delta file %s changed while it was being applied; it stays for the next poll", name)
  return False


def poll_once(refresher: refresh.Refresher, directory: str) -> PollResult:
  """Validates the pending files, publishes the good ones as one version and moves them aside."""
  result = PollResult()
  names = pending_files(directory)
  if not names:
    # An idle poll publishes a finished background retrain of the index (if any) without waiting for a delta.
    result.report = refresher.publish_retrained()
    return result
  row_of = refresher.source().row_of
  merged = refresh_delta.CatalogDelta()
  deltas, read_as = {}, {}
  for name in names:
    try:
      read_as[name] = _signature(os.path.join(directory, name))
      deltas[name] = refresh_delta.read_delta(os.path.join(directory, name))
      candidate = copy.deepcopy(merged)
      candidate.merge(deltas[name])
      candidate.check_against(row_of)
    except (OSError, UnicodeDecodeError, ValueError) as e:
      if name in read_as and _still_as_read(directory, name, read_as[name]):
        _reject(directory, name, e, result)
      continue
    merged = candidate
    result.accepted.append(name)
  if not result.accepted:
    return result
  if not merged:
    logging.info("Delta files %s change nothing; no version published", result.accepted)
    _set_aside(directory, result.accepted, "empty-", read_as)
    return result
  try:
    result.report = refresher.apply(merged)
  except ValueError as e:
    # The files parse and fit the catalog, but the catalog they make cannot be published (say, fewer
    # ads than k). Retried together they would fail at every poll and hold back every later file, so
    # each is published alone, in order, and the one that cannot be goes to failed/.
    logging.error("Publishing %s together failed (%s); publishing them one by one", result.accepted, e)
    accepted, result.accepted = result.accepted, []
    _publish_one_by_one(refresher, directory, accepted, deltas, read_as, result)
    return result
  _set_aside(directory, result.accepted, f"v{result.report['version']}-", read_as)
  return result


def _set_aside(directory: str, names: list[str], prefix: str, read_as: dict[str, tuple[int, int]]) -> None:
  for name in names:
    if _still_as_read(directory, name, read_as[name]):
      _move(directory, name, PROCESSED_DIR, prefix + name)


def _publish_one_by_one(
  refresher: refresh.Refresher,
  directory: str,
  names: list[str],
  deltas: dict[str, refresh_delta.CatalogDelta],
  read_as: dict[str, tuple[int, int]],
  result: PollResult,
) -> None:
  """Publishes each file alone, in order, into `result`; one that cannot be published goes to failed/."""
  for name in names:
    try:
      report = refresher.apply(deltas[name]) if deltas[name] else None
    except ValueError as e:
      if _still_as_read(directory, name, read_as[name]):
        _reject(directory, name, e, result)
      continue
    result.accepted.append(name)
    result.report = report or result.report
    _set_aside(directory, [name], f"v{report['version']}-" if report else "empty-", read_as)


def watch(
  refresher: refresh.Refresher,
  directory: str,
  interval_seconds: float,
  max_polls: int = 0,
  on_poll: Callable[[PollResult], None] | None = None,
) -> None:
  """Polls `directory` every `interval_seconds` (from the start of one poll to the next) for ever.

  Args:
    refresher: publishes the deltas.
    directory: where delta files are dropped.
    interval_seconds: the schedule.
    max_polls: stop after this many polls (0: never).
    on_poll: called with each poll's result.
  """
  os.makedirs(directory, exist_ok=True)
  refresher.prepare()  # Fail fast without a version, and keep the first publish short.
  logging.info("Watching %s for delta files every %gs", directory, interval_seconds)
  polls = 0
  while True:
    started = time.monotonic()
    try:
      result = poll_once(refresher, directory)
    except Exception:  # pylint: disable=broad-except  A failed publish is retried at the next poll.
      logging.exception("Publishing the deltas in %s failed; retrying at the next poll", directory)
      result = PollResult()
    if on_poll is not None:
      on_poll(result)
    polls += 1
    if max_polls and polls >= max_polls:
      return
    time.sleep(max(0.0, interval_seconds - (time.monotonic() - started)))
