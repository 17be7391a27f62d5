"""Versioned model directories as TF Serving reads them: BASE/<integer version>/saved_model.pb.

A version is written under a hidden temporary name in the same directory, flushed to disk, and
renamed into place, so a server polling BASE never sees a half-written version: the rename is atomic
on one file system, and TF Serving (like fgr-serve) ignores names that are not integers. The flush
makes the version durable before it is visible: after a machine crash a published version is whole,
not a renamed directory of empty files. It also keeps the kernel's later writeback of hundreds of
megabytes out of the moment servers load the version.

A publish killed outright (SIGKILL, OOM) leaves its temporary directory behind. Each one records the
process writing it, so the next publish or prune on the same host deletes it as soon as that process
is gone; one whose owner this host cannot check (another host on a shared file system, or no record)
is deleted once untouched for an hour.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from absl import logging

_TEMP_PREFIX = ".tmp-version-"
# In each temporary directory: the process writing it (`_this_process`).
_OWNER_FILE = "owner.json"
# How long a temporary directory whose owner cannot be checked stays untouched before it is deleted:
# a live publish may be writing into it from another host.
STALE_TEMP_SECONDS = 3600.0
# Messages of failed writes that mean the file system is full (TensorFlow's SaveV2 raises
# ResourceExhaustedError with the first; the second is a quota).
_DISK_FULL = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


class DiskFullError(OSError):
  """The file system of a base path filled up during a publish: nothing was published."""

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)

  def __str__(self) -> str:
    return self.strerror


def version_number(name: str) -> int | None:
  """The version a directory name stands for, as TF Serving parses it (an int64 in ASCII digits), or None.

  (`str.isdigit` alone would take "²" or "٣", which TF Serving does not.)
  """
  if not (name.isascii() and name.isdigit()) or int(name) >= 2**63:
    return None
  return int(name)


def list_versions(base_path: str) -> list[int]:
  """Integer versions under base_path that hold a saved_model.pb, ascending."""
  if not os.path.isdir(base_path):
    return []
  versions = []
  for name in os.listdir(base_path):
    number = version_number(name)
    if number is not None and os.path.exists(os.path.join(base_path, name, "saved_model.pb")):
      versions.append(number)
  return sorted(versions)


# The largest version TF Serving loads: versions are int64s.
MAX_VERSION = 2**63 - 1


def next_version(base_path: str) -> int:
  """One above the largest version present (or in the way as a directory), starting at 1."""
  names = os.listdir(base_path) if os.path.isdir(base_path) else []
  taken = [number for number in map(version_number, names) if number is not None]
  newest = max(taken, default=0)
  if newest == MAX_VERSION:
    raise ValueError(
      f"{base_path} holds version {MAX_VERSION}, the largest TF Serving loads (an int64): no later version "
      "can be published there; move that version away, or pass --version"
    )
  return newest + 1


def check_version(version: int) -> None:
  """Raises ValueError unless `version` is a positive int64: TF Serving loads no other directory name."""
  if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
    raise ValueError(
      f"A version must be a positive integer up to {MAX_VERSION} (TF Serving serves BASE/1/, BASE/2/, ... as "
      f"int64s), got {version!r}"
    )


def check_free(base_path: str, version: int) -> None:
  """Raises FileExistsError if BASE/<version> exists: versions are never overwritten."""
  final_path = os.path.join(base_path, str(version))
  if os.path.exists(final_path):
    raise FileExistsError(f"Version {version} already exists at {final_path}: versions are never overwritten")


def check_base_path(base_path: str) -> None:
  """Raises unless versions can be published under `base_path`: a directory, or one that can be made.

  For a check before a build that takes minutes: `publish` found a file in the way only after it, as
  "[Errno 17] File exists".
  """
  if os.path.exists(base_path) and not os.path.isdir(base_path):
    raise NotADirectoryError(f"The model base path {base_path} is a file: versions are published as its subdirectories")
  existing = os.path.abspath(base_path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f"The model base path {base_path} can't be made: {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"The model base path {base_path} can't be written: {existing} is not writable")


@contextlib.contextmanager
def publish(base_path: str, version: int | None = None) -> Iterator[tuple[str, int]]:
  """Yields (temporary directory, version) to write a version into; renames it into place on success.

  On any exception the temporary directory is removed and nothing is published; a full disk raises
  DiskFullError, naming the temporary directories that still hold space. A publish killed outright
  leaves only a hidden temporary name, which servers ignore and the next publish deletes
  (`remove_abandoned`).
  """
  if version is not None:
    check_version(version)
  os.makedirs(base_path, exist_ok=True)
  version = next_version(base_path) if version is None else version
  check_free(base_path, version)
  remove_abandoned(base_path)  # Space a killed publish left, before this one needs it.
  final_path = os.path.join(base_path, str(version))
  temp_root = None
  try:
    temp_root = _make_temp(base_path, f"{_TEMP_PREFIX}{version}-")
    temp_path = os.path.join(temp_root, "model")
    yield temp_path, version
    _sync_tree(temp_path)
    try:
      os.rename(temp_path, final_path)
    except OSError as e:
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        raise
      # The check above passed, so another writer published this number while this one was written.
      raise FileExistsError(
        f"Version {version} was published at {final_path} by another writer while this one was being written: "
        "nothing was published; run it again"
      ) from None
    _sync(base_path)
  except Exception as e:
    if not _is_disk_full(e):
      raise
    if temp_root is not None:  # Before measuring what is free.
      shutil.rmtree(temp_root, ignore_errors=True)
      temp_root = None
    raise DiskFullError(_disk_full_message(base_path, version)) from e
  finally:
    if temp_root is not None:
      shutil.rmtree(temp_root, ignore_errors=True)


def _is_disk_full(error: BaseException) -> bool:
  """Whether `error` (an OSError, or TensorFlow's error from a write op) says the file system is full."""
  if isinstance(error, OSError):
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
  return type(error).__name__ == "ResourceExhaustedError" and any(text in str(error) for text in _DISK_FULL)


def _disk_full_message(base_path: str, version: int) -> str:
  """One line: what filled up, and the temporary directories under `base_path` still holding space."""
  message = (
    f"No space left on device writing version {version} under {base_path} "
    f"({shutil.disk_usage(base_path).free / 2**20:.0f} MB free now): nothing was published"
  )
  others = _temp_dirs(base_path)
  if not others:
    return f"{message}; no temporary directories are left there: free space, or keep fewer versions"
  sizes = ", ".join(f"{name} ({_own_bytes(os.path.join(base_path, name)) / 2**20:.0f} MB)" for name in others)
  return f"{message}; temporary directories of publishes running or of unknown state hold space there: {sizes}"


def _own_bytes(path: str) -> int:
  """Disk space deleting `path` would free: the blocks of the files under it not linked elsewhere."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        stat = os.lstat(os.path.join(root, name))
      except FileNotFoundError:
        continue
      if stat.st_nlink == 1:
        total += stat.st_blocks * 512
  return total


def _temp_dirs(base_path: str) -> list[str]:
  return sorted(name for name in os.listdir(base_path) if name.startswith(_TEMP_PREFIX))


@functools.cache
def _this_host() -> dict[str, Any]:
  """Where a PID means this process's PID: the host name, its boot and the PID namespace."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      boot_id = f.read().strip()
    pid_namespace = os.stat("/proc/self/ns/pid").st_ino
  except OSError:  # Not Linux: the host name alone.
    boot_id, pid_namespace = None, None
  return {"host": socket.gethostname(), "boot_id": boot_id, "pid_namespace": pid_namespace}


def _start_time(pid: int) -> int | None:
  """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22), or None if unknown.

  Tells a process from a later one that got the same PID.
  """
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rpartition(")")[2].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _make_temp(base_path: str, prefix: str) -> str:
  """A new hidden directory under `base_path`, recording this process as its owner."""
  temp_root = tempfile.mkdtemp(prefix=prefix, dir=base_path)
  try:
    with open(os.path.join(temp_root, _OWNER_FILE), "w") as f:
      json.dump({**_this_host(), "pid": os.getpid(), "started": _start_time(os.getpid())}, f)
  except BaseException:
    shutil.rmtree(temp_root, ignore_errors=True)
    raise
  return temp_root


def _owner_gone(temp_root: str) -> bool | None:
  """Whether the process that made `temp_root` has ended; None when this host cannot tell (another host
  or boot, or no owner record: a publish killed before it wrote one, or one from an earlier release)."""
  try:
    with open(os.path.join(temp_root, _OWNER_FILE)) as f:
      owner = json.load(f)
    pid = int(owner["pid"])
  except (OSError, ValueError, KeyError, TypeError):
    return None
  if any(owner.get(key) != value for key, value in _this_host().items()):
    return None
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    pass  # Alive, as another user.
  started = _start_time(pid)
  return started is not None and owner.get("started") is not None and started != owner["started"]


def remove_abandoned(base_path: str, stale_temp_seconds: float = STALE_TEMP_SECONDS) -> list[str]:
  """Deletes the temporary directories under `base_path` that no publish will finish; returns their names.

  Those are the ones whose owner process is gone (on this host), and those whose owner cannot be
  checked once untouched for `stale_temp_seconds` (a live publish may be writing into a younger one).
  """
  removed, now = [], time.time()
  for name in _temp_dirs(base_path):
    path = os.path.join(base_path, name)
    gone = _owner_gone(path)
    try:
      abandoned = gone if gone is not None else now - os.path.getmtime(path) > stale_temp_seconds
    except FileNotFoundError:
      continue  # Its publish finished meanwhile.
    if abandoned:
      shutil.rmtree(path, ignore_errors=True)
      removed.append(name)
      logging.warning("Deleted %s, left by a publish that did not finish", path)
  return removed


def _sync(path: str) -> None:
  """fsync(2) of a file or directory."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _sync_tree(path: str) -> None:
  """Flushes every file and directory under `path` to disk."""
  for root, _, files in os.walk(path, topdown=False):
    for name in files:
      _sync(os.path.join(root, name))
    _sync(root)


def remove_version(base_path: str, version: int) -> None:
  """Deletes a version: renamed to a hidden name first, so a polling server never sees it half-deleted."""
  hidden = _make_temp(base_path, f"{_TEMP_PREFIX}{version}-removed-")
  os.rename(os.path.join(base_path, str(version)), os.path.join(hidden, "model"))
  shutil.rmtree(hidden, ignore_errors=True)


def prune(base_path: str, keep: int, stale_temp_seconds: float = STALE_TEMP_SECONDS) -> list[int]:
  """Keeps the `keep` newest versions and deletes the rest; returns the deleted versions.

  Also deletes temporary directories left by publishes killed outright (`remove_abandoned`).
  """
  if keep < 1:
    raise ValueError(f"keep must be at least 1, got {keep}")
  removed = list_versions(base_path)[:-keep]
  for version in removed:
    remove_version(base_path, version)
  remove_abandoned(base_path, stale_temp_seconds)
  return removed
