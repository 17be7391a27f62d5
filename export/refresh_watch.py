"""Continuous refresh: publishes the catalog delta files dropped into a directory, on a schedule.

Each poll takes the `*.jsonl` files in the directory (names starting with "." are ignored, so a
writer can create `.name.jsonl` and rename it when complete), in name order, once each is written:
its size and mtime have not changed for a settle time (`Settle`). That covers writers that do not
rename: a file still changing, and every file after it in name order, is left for the next poll. So is
a file some process still holds open for writing, where Linux can tell (`open_for_writing`): its
writer may write again after the poll, and those lines would land in processed/, never applied.

A file that does not parse, or that contradicts the catalog (a status change for an unknown ad), is
moved to `failed/` with a `.error` note and nothing of it is applied. The good files are merged and
published as one version; then they move to `processed/`, prefixed with that version (or with
"unchanged-" when together they change nothing, and nothing is published). If publishing
fails, they stay where they are and the next poll tries again, unless the catalog they make cannot
be published at all (fewer ads than k): then each is published alone and the one that cannot be goes
to `failed/`. A file that changed after it was read (its writer paused longer than the settle time)
is not moved: it stays, with the files after it, and the next poll applies them again whole, in the
same order. Re-applying is harmless: every line sets an ad's state (features, status, removal), so
the same lines in the same order end in the same catalog. A name already in `failed/` or `processed/`
gets a -2, -3... suffix, and only the newest `keep_files` delta files of each are kept. A poll with
no files publishes the refresher's finished background retrain, if any.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import os
import time
from collections.abc import Callable
from typing import Any

from absl import logging

from export import refresh, refresh_delta

try:
  import fcntl
except ImportError:  # Windows: the settle rule alone applies (`open_for_writing`).
  fcntl = None

PROCESSED_DIR = "processed"
FAILED_DIR = "failed"
SUFFIX = ".jsonl"
ERROR_SUFFIX = ".error"
# How long a file's size and mtime must stay the same before it is read (`--settle`): long enough for
# a writer that flushes block by block, short next to the default 60 s interval (README, fgr-refresh).
DEFAULT_SETTLE_SECONDS = 2.0
# Delta files kept in each of processed/ and failed/ (`--keep_processed_files`; 0 keeps all).
DEFAULT_KEEP_FILES = 1000

Signature = tuple[int, int]


@dataclasses.dataclass
class PollResult:
  """What one poll did.

  Attributes:
    accepted: files applied (and moved to processed/, unless they changed meanwhile).
    rejected: files moved to failed/, with why.
    waiting: files left for the next poll: still being written, or after one that is.
    report: the published version's report, if any.
  """

  accepted: list[str] = dataclasses.field(default_factory=list)
  rejected: dict[str, str] = dataclasses.field(default_factory=dict)
  waiting: list[str] = dataclasses.field(default_factory=list)
  report: dict[str, Any] | None = None


@dataclasses.dataclass
class Settle:
  """When a delta file counts as written: its (size, mtime) stayed the same for `seconds`.

  What a poll saw is remembered, so a file already seen unchanged that long ago is taken at once;
  the others are looked at again after waiting out the rest of `seconds`.

  Args:
    seconds: the settle time; 0 takes every file at once (for writers that rename files in).
    sleep: how the wait is spent (tests stand in for a writer here).
  """

  seconds: float = DEFAULT_SETTLE_SECONDS
  sleep: Callable[[float], None] = time.sleep
  # Each pending file's signature when last looked at, and since when (time.monotonic()) it has had it.
  _seen: dict[str, tuple[Signature, float]] = dataclasses.field(default_factory=dict, init=False, repr=False)

  def settled(self, directory: str, names: list[str]) -> dict[str, Signature]:
    """The files among `names` that are written, each with the signature it settled at."""
    now = time.monotonic()
    current = {}
    for name in names:
      try:
        current[name] = _signature(os.path.join(directory, name))
      except FileNotFoundError:
        pass
    self._seen = {
      name: self._seen[name] if self._seen.get(name, (None,))[0] == signature else (signature, now)
      for name, signature in current.items()
    }
    unsettled = {
      name: self.seconds - (now - since) for name, (_, since) in self._seen.items() if now - since < self.seconds
    }
    if unsettled:
      self.sleep(max(unsettled.values()))
      for name in unsettled:
        try:
          signature = _signature(os.path.join(directory, name))
        except FileNotFoundError:
          signature = None
        if signature == current[name]:
          continue  # Unchanged across the wait.
        del current[name]
        if signature is None:
          del self._seen[name]
        else:
          self._seen[name] = (signature, time.monotonic())
    for name in list(current):
      if open_for_writing(os.path.join(directory, name)):
        # Paused past the settle time with the file still open: taken now, its later lines would land in
        # processed/ and never be applied. It waits, as a file still changing does, until it is closed.
        logging.info("Delta file %s is still open for writing", name)
        del current[name]
    return current


def open_for_writing(path: str) -> bool:
  """Whether some process holds `path` open for writing, where Linux can tell (False where it cannot).

  Linux grants a read lease (fcntl F_SETLEASE) only on a file nobody has open for writing, and says
  EAGAIN otherwise; the lease is released at once. Elsewhere (another OS, NFS, a file of another user
  without CAP_LEASE) the settle rule alone applies.
  """
  if fcntl is None or not hasattr(fcntl, "F_SETLEASE"):
    return False
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  except OSError:
    return False  # Gone: the caller finds that out itself.
  try:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
  except OSError as e:
    return e.errno == errno.EAGAIN
  else:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False
  finally:
    os.close(fd)


def pending_files(directory: str) -> list[str]:
  """Delta files waiting in `directory`, in name order."""
  return sorted(
    name
    for name in os.listdir(directory)
    if name.endswith(SUFFIX) and not name.startswith(".") and os.path.isfile(os.path.join(directory, name))
  )


def _free_name(target_dir: str, new_name: str) -> str:
  """`new_name`, or the first free `<stem>-<n><suffix>` (n = 2, 3...) if a delta file or note has it.

  Taken suffixes are found by doubling n and then bisecting, so a name taken a thousand times costs
  about twenty lookups, not a thousand. (After retention removed old ones, a free n may be found past
  a gap rather than in it: still a free name.)
  """
  stem, suffix = os.path.splitext(new_name)

  def name(n: int) -> str:
    return new_name if n == 1 else f"{stem}-{n}{suffix}"

  def taken(n: int) -> bool:
    path = os.path.join(target_dir, name(n))
    return os.path.exists(path) or os.path.exists(path + ERROR_SUFFIX)

  if not taken(1):
    return name(1)
  low, high = 1, 2  # low is taken; is high?
  while taken(high):
    low, high = high, high * 2
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if taken(middle) else (low, middle)
  return name(high)


def _move(directory: str, name: str, subdirectory: str, new_name: str) -> str:
  """Moves a delta file into `subdirectory`; a name taken there by an earlier file gets a -2, -3... suffix."""
  target_dir = os.path.join(directory, subdirectory)
  os.makedirs(target_dir, exist_ok=True)
  target = os.path.join(target_dir, _free_name(target_dir, new_name))
  os.replace(os.path.join(directory, name), target)
  os.utime(target)  # Its mtime is now when it was set aside, which retention (`prune_kept`) goes by.
  return target


def prune_kept(directory: str, keep: int) -> list[str]:
  """Deletes all but the `keep` newest delta files (with their .error notes) of processed/ and failed/.

  Newest by mtime, which `_move` sets to when it moved the file. Returns the deleted paths.
  """
  deleted = []
  for subdirectory in (PROCESSED_DIR, FAILED_DIR):
    path = os.path.join(directory, subdirectory)
    if not keep or not os.path.isdir(path):
      continue
    moved_at: dict[str, int] = {}  # By delta file name; a note counts as its file.
    for entry in os.scandir(path):
      name = entry.name.removesuffix(ERROR_SUFFIX)
      if not name.endswith(SUFFIX) or not entry.is_file(follow_symlinks=False):
        continue  # Not a delta file or note of ours.
      mtime = entry.stat(follow_symlinks=False).st_mtime_ns
      moved_at[name] = min(moved_at.get(name, mtime), mtime)
    for name in sorted(moved_at, key=lambda name: (moved_at[name], name))[:-keep]:
      for file_name in (name, name + ERROR_SUFFIX):
        try:
          os.remove(os.path.join(path, file_name))
          deleted.append(os.path.join(path, file_name))
        except FileNotFoundError:
          pass
  return deleted


def _reject(directory: str, name: str, error: Exception, result: PollResult) -> None:
  """Moves a delta file to failed/ with a .error note; nothing of it is applied."""
  result.rejected[name] = str(error)
  target = _move(directory, name, FAILED_DIR, name)
  with open(target + ERROR_SUFFIX, "w") as f:
    f.write(f"{error}\n")
  logging.error("Rejected delta file %s (nothing of it applied; moved to %s): %s", name, target, error)


def _signature(path: str) -> Signature:
  """(size, mtime) of a file: changed if its writer is still writing it."""
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns


def _still_as_read(directory: str, name: str, read_as: Signature) -> bool:
  """Whether a file is as it was read; if not, it stays for the next poll (a writer not using a dot-name
  and a rename is still writing it: moving it now would cut its later lines off)."""
  try:
    if _signature(os.path.join(directory, name)) == read_as:
      return True
  except FileNotFoundError:
    logging.warning("Delta file %s was removed while it was being applied", name)
    return False
  logging.warning("Delta file %s changed after it was read; it stays for the next poll", name)
  return False


def poll_once(
  refresher: refresh.Refresher, directory: str, settle: Settle | None = None, keep_files: int = DEFAULT_KEEP_FILES
) -> PollResult:
  """Validates the written pending files, publishes the good ones as one version and moves them aside.

  Args:
    refresher: publishes the deltas.
    directory: the watched directory.
    settle: when a file counts as written; a new `Settle()` (the default settle time) when None.
    keep_files: delta files kept in each of processed/ and failed/ (0 keeps all).
  """
  result = PollResult()
  names = pending_files(directory)
  if not names:
    # An idle poll publishes a finished background retrain of the index (if any) without waiting for a delta.
    result.report = refresher.publish_retrained()
    return result
  settled = (settle or Settle()).settled(directory, names)
  # Files apply in name order, so one still being written holds back the files after it.
  written = next((i for i, name in enumerate(names) if name not in settled), len(names))
  names, result.waiting = names[:written], names[written:]
  if result.waiting:
    logging.info("Delta file %s is still being written; it and later files wait for the next poll", result.waiting[0])
  deltas = _read(directory, names, settled, result)
  if deltas:
    merged = _merge(directory, deltas, refresher.source().row_of, settled, result)
    if result.accepted:
      _publish(refresher, directory, merged, deltas, settled, result)
  result.waiting.sort()
  prune_kept(directory, keep_files)
  return result


def _read(
  directory: str, names: list[str], read_as: dict[str, Signature], result: PollResult
) -> dict[str, refresh_delta.CatalogDelta]:
  """Each file's delta, in order; a bad file goes to failed/, and one that changed since it settled
  waits, with the files after it."""
  deltas = {}
  for i, name in enumerate(names):
    try:
      deltas[name] = refresh_delta.read_delta(os.path.join(directory, name))
    except (OSError, UnicodeDecodeError, ValueError) as e:
      if not _still_as_read(directory, name, read_as[name]):
        result.waiting[:0] = names[i:]
        break
      _reject(directory, name, e, result)
  return deltas


def _merge(
  directory: str,
  deltas: dict[str, refresh_delta.CatalogDelta],
  row_of: dict[str, int],
  read_as: dict[str, Signature],
  result: PollResult,
) -> refresh_delta.CatalogDelta:
  """The files' merged delta, into `result.accepted`; files that contradict the catalog go to failed/.

  The files are checked together first, as `--delta a b` checks them: a status change that a later
  file's removal overrides is no error. (That is also what a re-read file applied again after the
  files that followed it needs.) Only if that fails is each checked on top of those before it.
  """
  merged = refresh_delta.CatalogDelta()
  try:
    for delta in deltas.values():
      merged.merge(delta)
    merged.check_against(row_of)
  except ValueError:
    pass
  else:
    result.accepted.extend(deltas)
    return merged
  merged = refresh_delta.CatalogDelta()
  for i, (name, delta) in enumerate(deltas.items()):
    candidate = copy.deepcopy(merged)
    try:
      candidate.merge(delta)
      candidate.check_against(row_of)
    except ValueError as e:
      if not _still_as_read(directory, name, read_as[name]):
        result.waiting[:0] = list(deltas)[i:]
        break
      _reject(directory, name, e, result)
      continue
    merged = candidate
    result.accepted.append(name)
  return merged


def _publish(
  refresher: refresh.Refresher,
  directory: str,
  merged: refresh_delta.CatalogDelta,
  deltas: dict[str, refresh_delta.CatalogDelta],
  read_as: dict[str, Signature],
  result: PollResult,
) -> None:
  """Publishes the accepted files as one version, then moves them to processed/."""
  if not merged:
    logging.info("Delta files %s change nothing; no version published", result.accepted)
    _set_aside(directory, result.accepted, "empty-", read_as, result)
    return
  try:
    result.report = refresher.apply(merged)
  except ValueError as e:
    # The files parse and fit the catalog, but the catalog they make cannot be published (say, fewer
    # ads than k). Retried together they would fail at every poll and hold back every later file, so
    # each is published alone, in order, and the one that cannot be goes to failed/.
    logging.error("Publishing %s together failed (%s); publishing them one by one", result.accepted, e)
    accepted, result.accepted = result.accepted, []
    _publish_one_by_one(refresher, directory, accepted, deltas, read_as, result)
    return
  _set_aside(directory, result.accepted, _processed_prefix(result.report), read_as, result)


def _processed_prefix(report: dict[str, Any]) -> str:
  """processed/'s name prefix of the files a report answered: the version they made, or "unchanged-"."""
  return "unchanged-" if report.get("published") is False else f"v{report['version']}-"


def _set_aside(
  directory: str, names: list[str], prefix: str, read_as: dict[str, Signature], result: PollResult
) -> bool:
  """Moves applied files to processed/ in order, up to one that changed since it was read: that one and
  the files after it stay, to be applied again in the same order. Returns whether all moved."""
  for i, name in enumerate(names):
    if not _still_as_read(directory, name, read_as[name]):
      result.waiting.extend(names[i:])
      return False
    _move(directory, name, PROCESSED_DIR, prefix + name)
  return True


def _publish_one_by_one(
  refresher: refresh.Refresher,
  directory: str,
  names: list[str],
  deltas: dict[str, refresh_delta.CatalogDelta],
  read_as: dict[str, Signature],
  result: PollResult,
) -> None:
  """Publishes each file alone, in order, into `result`; one that cannot be published goes to failed/."""
  for i, name in enumerate(names):
    try:
      report = refresher.apply(deltas[name]) if deltas[name] else None
    except ValueError as e:
      if not _still_as_read(directory, name, read_as[name]):
        result.waiting.extend(names[i:])
        return
      _reject(directory, name, e, result)
      continue
    result.accepted.append(name)
    result.report = report or result.report
    prefix = _processed_prefix(report) if report else "empty-"
    if not _set_aside(directory, [name], prefix, read_as, result):
      result.waiting.extend(names[i + 1 :])
      return


def watch(
  refresher: refresh.Refresher,
  directory: str,
  interval_seconds: float,
  max_polls: int = 0,
  on_poll: Callable[[PollResult], None] | None = None,
  settle_seconds: float = DEFAULT_SETTLE_SECONDS,
  keep_files: int = DEFAULT_KEEP_FILES,
) -> None:
  """Polls `directory` every `interval_seconds` (from the start of one poll to the next) for ever.

  Args:
    refresher: publishes the deltas.
    directory: where delta files are dropped.
    interval_seconds: the schedule.
    max_polls: stop after this many polls (0: never).
    on_poll: called with each poll's result.
    settle_seconds: how long a file must stay unchanged before it is read (`Settle`).
    keep_files: delta files kept in each of processed/ and failed/ (0 keeps all).
  """
  os.makedirs(directory, exist_ok=True)
  refresher.prepare()  # Fail fast without a version, and keep the first publish short.
  logging.info("Watching %s for delta files every %gs", directory, interval_seconds)
  polls, settle = 0, Settle(settle_seconds)
  while True:
    started = time.monotonic()
    try:
      result = poll_once(refresher, directory, settle, keep_files)
    except Exception:  # pylint: disable=broad-except  A failed publish is retried at the next poll.
      logging.exception("Publishing the deltas in %s failed; retrying at the next poll", directory)
      result = PollResult()
    if on_poll is not None:
      on_poll(result)
    polls += 1
    if max_polls and polls >= max_polls:
      return
    time.sleep(max(0.0, interval_seconds - (time.monotonic() - started)))
