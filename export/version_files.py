"""What a version directory holds besides its graph, and sharing those files between versions.

A version is a SavedModel (saved_model.pb, variables/, fingerprint.pb) plus `assets.extra`, which TF
Serving reads only for its warm-up records; our report, catalog embeddings and warm-up records live
there. Published versions are never modified in place, so later versions share their files by hard
links.
"""

from __future__ import annotations

import os
import shutil

EXTRA_DIR = "assets.extra"
FINGERPRINT_FILE = "fingerprint.pb"


def variables_prefix(version_path: str) -> str:
  """The checkpoint prefix of a SavedModel's variables."""
  return os.path.join(version_path, "variables", "variables")


def extra_path(version_path: str, name: str) -> str:
  """The path of file `name` in a version's assets.extra."""
  return os.path.join(version_path, EXTRA_DIR, name)


def link_tree(source: str, destination: str, skip: tuple[str, ...] = ()) -> None:
  """Recreates `source` at `destination` with hard links (copies across file systems).

  Versions are never modified in place, so sharing their files between versions is safe. `skip` holds
  paths relative to `source` (files or directories) to leave out.
  """
  for root, dirs, files in os.walk(source):
    relative = os.path.relpath(root, source)
    dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(relative, d)) not in skip]
    os.makedirs(os.path.join(destination, relative), exist_ok=True)
    for name in files:
      path = os.path.normpath(os.path.join(relative, name))
      if path in skip:
        continue
      link_file(os.path.join(source, path), os.path.join(destination, path))


def link_file(source: str, destination: str) -> None:
  """Hard-links a file of a published version (never modified in place), or copies it across file systems."""
  try:
    os.link(source, destination)
  except OSError:
    shutil.copy2(source, destination)
