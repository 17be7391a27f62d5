"""Versioned model directories as TF Serving reads them: BASE/<integer version>/saved_model.pb.

A version is written under a hidden temporary name in the same directory, flushed to disk, and
renamed into place, so a server polling BASE never sees a half-written version: the rename is atomic
on one file system, and TF Serving (like fgr-serve) ignores names that are not integers. The flush
makes the version durable before it is visible: after a machine crash a published version is whole,
not a renamed directory of empty files. It also keeps the kernel's later writeback of hundreds of
megabytes out of the moment servers load the version.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

_TEMP_PREFIX = ".tmp-version-"


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


def next_version(base_path: str) -> int:
  """One above the largest version present (or in the way as a directory), starting at 1."""
  names = os.listdir(base_path) if os.path.isdir(base_path) else []
  taken = [number for number in map(version_number, names) if number is not None]
  return max(taken, default=0) + 1


def check_version(version: int) -> None:
  """Raises ValueError unless `version` is a positive integer: TF Serving loads no other directory name."""
  if isinstance(version, bool) or not isinstance(version, int) or version < 1:
    raise ValueError(f"A version must be a positive integer (TF Serving serves BASE/1/, BASE/2/, ...), got {version!r}")


def check_free(base_path: str, version: int) -> None:
  """Raises FileExistsError if BASE/<version> exists: versions are never overwritten."""
  final_path = os.path.join(base_path, str(version))
  if os.path.exists(final_path):
    raise FileExistsError(f"Version {version} already exists at {final_path}: versions are never overwritten")


@contextlib.contextmanager
def publish(base_path: str, version: int | None = None) -> Iterator[tuple[str, int]]:
  """Yields (temporary directory, version) to write a version into; renames it into place on success.

  On any exception the temporary directory is removed and nothing is published. A publish killed
  outright leaves only a hidden temporary name, which servers ignore.
  """
  if version is not None:
    check_version(version)
  os.makedirs(base_path, exist_ok=True)
  version = next_version(base_path) if version is None else version
  check_free(base_path, version)
  final_path = os.path.join(base_path, str(version))
  temp_root = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{version}-", dir=base_path)
  temp_path = os.path.join(temp_root, "model")
  try:
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
  finally:
    shutil.rmtree(temp_root, ignore_errors=True)


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
  hidden = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{version}-removed-", dir=base_path)
  os.rename(os.path.join(base_path, str(version)), os.path.join(hidden, "model"))
  shutil.rmtree(hidden, ignore_errors=True)


def prune(base_path: str, keep: int, stale_temp_seconds: float = 3600.0) -> list[int]:
  """Keeps the `keep` newest versions and deletes the rest; returns the deleted versions.

  Also deletes temporary directories left by publishes killed outright, once they have not been
  touched for `stale_temp_seconds` (a live publish may still be writing into a younger one).
  """
  if keep < 1:
    raise ValueError(f"keep must be at least 1, got {keep}")
  removed = list_versions(base_path)[:-keep]
  for version in removed:
    remove_version(base_path, version)
  now = time.time()
  for name in os.listdir(base_path):
    path = os.path.join(base_path, name)
    if name.startswith(_TEMP_PREFIX) and now - os.path.getmtime(path) > stale_temp_seconds:
      shutil.rmtree(path, ignore_errors=True)
  return removed
