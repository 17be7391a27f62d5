"""What a refresh starts from: a version's report and the catalog state it carries.

A version's row order, ad ids and eligibility live in its variables (`item_ids`, `index/eligible`).
The float item embeddings are kept next to them in `assets.extra/catalog_embeddings.npy` (row i is
`item_ids[i]`): most index backends keep only compressed codes or a permuted copy, and recomputing
every embedding would need every ad's features. TF Serving ignores files in assets.extra other than
the warm-up records.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from engine import base, full_graph
from export import version_files, version_report, versions
from models.data import tfrecord

EMBEDDINGS_FILE = "catalog_embeddings.npy"
# A channel graph's report key holding each channel's index build config by channel name (the top-level
# index_config is the first channel's).
CHANNEL_INDEX_CONFIGS = "channel_index_configs"


@dataclasses.dataclass
class CatalogState:
  """Every row of a version's index.

  Attributes:
    ids: [N] ad ids (object array of str).
    embeddings: float32 [N, d] item embeddings, as the version's `encode_item` computed them.
    eligible: bool [N], False for paused ads.
  """

  ids: np.ndarray
  embeddings: np.ndarray
  eligible: np.ndarray

  def row_of(self) -> dict[str, int]:
    return dict(zip(self.ids.tolist(), range(len(self.ids))))


def embeddings_path(version_path: str, channel: str | None = None) -> str:
  """Where a version keeps its catalog embeddings (a channel graph: one file per channel)."""
  name = EMBEDDINGS_FILE if channel is None else EMBEDDINGS_FILE.replace(".npy", f"_{channel}.npy")
  return version_files.extra_path(version_path, name)


def write_embeddings(saved_model_dir: str, embeddings: np.ndarray, channel: str | None = None) -> str:
  """Writes the float32 [N, d] catalog embeddings into saved_model_dir/assets.extra; returns the path."""
  path = embeddings_path(saved_model_dir, channel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.save(path, np.ascontiguousarray(embeddings, dtype=np.float32))
  return path


# (device, inode, size, mtime) of a version's graph, variables index and report (None for a missing file).
Identity = tuple[tuple[int, int, int, int] | None, ...]


def version_identity(version_path: str) -> Identity:
  """What tells a version directory from another one published later under the same number.

  Every publish writes the report anew, and the graph and variables anew or as hard links of another
  version's, and nothing changes them in place: the same files mean the same version. (A number is
  reused when someone deletes the newest version and another writer publishes.)
  """
  identity = []
  for path in (
    os.path.join(version_path, "saved_model.pb"),
    version_files.variables_prefix(version_path) + ".index",
    version_report.path(version_path),
  ):
    try:
      stat = os.stat(path)
    except FileNotFoundError:
      identity.append(None)
      continue
    identity.append((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))
  return tuple(identity)


def read_variables(version_path: str, keys: list[str]) -> list[np.ndarray]:
  """The values of `keys` in a version's checkpoint.

  Raises:
    ValueError: the checkpoint cannot be read (a damaged or half-written version), naming the version
      and what to do, where TF's reader raises IndexError or RuntimeError with only its own words.
  """
  try:
    reader = tf.train.load_checkpoint(version_files.variables_prefix(version_path))
    return [reader.get_tensor(key) for key in keys]
  except (tf.errors.OpError, RuntimeError, IndexError) as e:
    raise ValueError(
      f"{version_path}: its checkpoint cannot be read ({tfrecord.tf_error_reason(e)}); "
      "the version is damaged or half-written: remove it, or refresh an earlier one with --from_version"
    ) from e


def read_state(version_path: str) -> CatalogState:
  """Reads a version's ids and eligibility from its checkpoint and its embeddings file."""
  path = embeddings_path(version_path)
  if not os.path.exists(path):
    if version_report.exists(version_path) and "channels" in version_report.read(version_path).extra:
      raise ValueError(
        f"{version_path} is a channel graph: each channel keeps its own catalog embeddings "
        "(read them with export.refresh_channels.read_states)"
      )
    raise FileNotFoundError(
      f"{path} is missing: the version was exported before fgr-export kept the catalog "
      "embeddings; export it again to refresh it"
    )
  ids, eligible = read_variables(version_path, [full_graph.ITEM_IDS_KEY, full_graph.ELIGIBLE_KEY])
  ids, eligible = base.decoded_strings(ids), eligible.astype(bool)
  embeddings = np.load(path, mmap_mode="r")
  if embeddings.shape[0] != len(ids) or eligible.shape != ids.shape:
    raise ValueError(
      f"{version_path}: {len(ids)} ids, {eligible.shape[0]} eligibility flags and "
      f"{embeddings.shape[0]} embeddings do not match"
    )
  return CatalogState(ids=ids, embeddings=embeddings, eligible=eligible)


@dataclasses.dataclass
class Source:
  """The version a refresh starts from: its report, its catalog, and the row of each ad id."""

  version: int
  path: str
  report: version_report.VersionReport
  state: CatalogState
  row_of: dict[str, int]

  @property
  def eligible(self) -> np.ndarray:
    return self.state.eligible

  @classmethod
  def read(cls, base_path: str, version: int) -> Source:
    path = os.path.join(base_path, str(version))
    if version not in versions.list_versions(base_path):
      raise FileNotFoundError(f"No complete version {version} under {base_path}")
    report = version_report.read(path)
    state = read_state(path)
    return cls(version, path, report, state, state.row_of())
