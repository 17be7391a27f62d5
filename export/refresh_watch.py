"""Continuous refresh: publishes the catalog delta files dropped into a directory, on a schedule.

Each poll takes every `*.jsonl` file in the directory (names starting with "." are ignored, so a
writer can create `.name.jsonl` and rename it when complete), in name order. A file that does not
parse, or that contradicts the catalog (a status change for an unknown ad), is moved to `failed/`
with a `.error` note and nothing of it is applied. The good files are merged and published as one
version; then they move to `processed/`, prefixed with that version. If publishing fails, they stay
where they are and the next poll tries again (re-applying a delta is harmless: every change in it
is idempotent). A poll with no files publishes the refresher's finished background retrain, if any.
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
  target_dir = os.path.join(directory, subdirectory)
  os.makedirs(target_dir, exist_ok=True)
  target = os.path.join(target_dir, new_name)
  os.replace(os.path.join(directory, name), target)
  return target


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
  for name in names:
    try:
      candidate = copy.deepcopy(merged)
      candidate.merge(refresh_delta.read_delta(os.path.join(directory, name)))
      candidate.check_against(row_of)
    except (OSError, UnicodeDecodeError, ValueError) as e:
      result.rejected[name] = str(e)
      target = _move(directory, name, FAILED_DIR, name)
      with open(target + ".error", "w") as f:
        f.write(f"{e}\n")
      logging.error("Rejected delta file %s (nothing of it applied; moved to %s): %s", name, target, e)
      continue
    merged = candidate
    result.accepted.append(name)
  if not result.accepted:
    return result
  if merged:
    result.report = refresher.apply(merged)
    prefix = f"v{result.report['version']}-"
  else:
    prefix = "empty-"
    logging.info("Delta files %s change nothing; no version published", result.accepted)
  for name in result.accepted:
    _move(directory, name, PROCESSED_DIR, prefix + name)
  return result


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
