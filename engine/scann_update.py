"""Incremental ScaNN updates: new rows encoded with an existing index's trained partitioner and codebook.

Training is what makes a ScaNN build slow: k-means for the tree and the anisotropic codebook, over a
sample of the whole catalog. Encoding a point once they are trained is cheap: its token is its
nearest leaf centre, its code the AH (residual) quantisation under the codebook. A refresh that
changes a few percent of the catalog can therefore keep version N's partitioner and codebook, copy
the tokens and codes of unchanged rows, and encode only the new and changed rows.

The encoding is ScaNN's own: the assets of the TF searcher (`ScannState`: serialised config,
partitioner and codebook, tokens, codes, float dataset) have the same formats as the files of a
`scann_ops_pybind` searcher, so a pybind searcher is loaded from N's partitioner and codebook over
one seed row, the changed rows are `upsert`ed into it (ScaNN tokenises and hashes them with the
trained assets, leaving those unchanged), and their tokens and codes are read back. Unchanged rows
get bit-identical assets; a changed row gets what a full build with N's training would give it.

Recall drifts as the catalog moves away from the sample the partitioner was trained on, so callers
retrain (a full build) once the share of rows encoded this way passes a threshold.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import numpy as np
import tensorflow as tf

from engine import full_graph, scann_index

# Object path of a ScannIndex's state inside a saved FullGraph (its checkpoint keys: `index/state/...`).
STATE_SCOPE = f"{full_graph.INDEX}/{scann_index.STATE}"
_BYTES_ASSETS = ("scann_config", "serialized_partitioner", "ah_codebook")
ASSET_NAMES = scann_index.ASSET_NAMES


def _present(value: np.ndarray) -> bool:
  """ScaNN stands in a scalar (or an empty tensor) for an asset the searcher does not use."""
  return value.ndim > 0 and value.size > 0


def _pybind():
  from scann.scann_ops import scann_assets_pb2  # pylint: disable=g-import-not-at-top
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top

  return scann_assets_pb2, scann_ops_pybind


@dataclasses.dataclass
class ScannAssets:
  """A ScaNN searcher's assets as NumPy values, as `scann_to_tensors` returns and `tensors_to_scann` takes.

  Attributes:
    scann_config: string [1], the serialised ScannConfig proto.
    serialized_partitioner: string [1] (empty without a tree).
    datapoint_to_token: int32 [N] leaf of each row (empty without a tree).
    ah_codebook: string [1] (empty without AH scoring).
    hashed_dataset: uint8 [N, blocks] AH codes (empty without AH scoring).
    int8_dataset, int8_multipliers, dp_norms: int8 reordering assets (empty with float reordering).
    dataset: float32 [N, d] rows, used for exact reordering.
  """

  scann_config: np.ndarray
  serialized_partitioner: np.ndarray
  datapoint_to_token: np.ndarray
  ah_codebook: np.ndarray
  hashed_dataset: np.ndarray
  int8_dataset: np.ndarray
  int8_multipliers: np.ndarray
  dp_norms: np.ndarray
  dataset: np.ndarray

  @classmethod
  def from_state(cls, state: tf.Module) -> ScannAssets:
    """The assets held by a `ScannState` (e.g. `ScannIndex.state`)."""
    return cls(**{name: getattr(state, name).numpy() for name in ASSET_NAMES})

  @classmethod
  def from_checkpoint(cls, prefix: str, dataset: np.ndarray, scope: str = STATE_SCOPE) -> ScannAssets:
    """Reads the assets of the ScannState at `scope` from a TF checkpoint.

    Args:
      prefix: the checkpoint prefix (e.g. a SavedModel's variables/variables).
      dataset: float32 [N, d], the rows the index was built over. ScannIndex shares this variable with
        its exact fallback, so the checkpoint may file it under another name; callers have the rows.
      scope: the state's object path in the checkpoint.
    """
    reader = tf.train.load_checkpoint(prefix)
    values = {"dataset": dataset}
    for name in ASSET_NAMES[:-1]:
      key = full_graph.variable_key(f"{scope}/{name}")
      if not reader.has_tensor(key):
        raise KeyError(f"{prefix} has no ScaNN asset {key!r}: not a ScaNN version")
      values[name] = reader.get_tensor(key)
    assets = cls(**values)
    if assets.has_tree and assets.datapoint_to_token.shape[0] != assets.num_rows:
      raise ValueError(f"{prefix}: {assets.datapoint_to_token.shape[0]} tokens for {assets.num_rows} rows")
    return assets

  @property
  def num_rows(self) -> int:
    return int(self.dataset.shape[0])

  @property
  def has_tree(self) -> bool:
    return _present(self.datapoint_to_token)

  @property
  def has_ah(self) -> bool:
    return _present(self.hashed_dataset)

  def tensors(self) -> tuple[np.ndarray, ...]:
    return tuple(getattr(self, name) for name in ASSET_NAMES)

  def check_updatable(self) -> None:
    """Raises ValueError for assets this module cannot update (int8 reordering)."""
    if _present(self.int8_dataset) or _present(self.dp_norms):
      raise ValueError("ScaNN index with int8 reordering: incremental updates need float reordering")
    if self.has_tree and self.datapoint_to_token.shape != (self.num_rows,):
      raise ValueError(f"{self.datapoint_to_token.shape} tokens for {self.num_rows} rows (spilled tokens?)")
    if self.has_ah and self.hashed_dataset.shape[0] != self.num_rows:
      raise ValueError(f"{self.hashed_dataset.shape[0]} AH codes for {self.num_rows} rows")


def _write_artifacts(directory: str, assets: ScannAssets, rows: slice) -> None:
  """Writes `assets` (restricted to `rows`) as a scann_ops_pybind artifacts directory."""
  assets_pb2, _ = _pybind()
  manifest = assets_pb2.ScannAssets()

  def add(filename: str, asset_type: int) -> str:
    path = os.path.join(directory, filename)
    manifest.assets.append(assets_pb2.ScannAsset(asset_path=path, asset_type=asset_type))
    return path

  kind = assets_pb2.ScannAsset
  with open(os.path.join(directory, "scann_config.pb"), "wb") as f:
    f.write(assets.scann_config.reshape(-1)[0])
  if assets.has_ah:
    with open(add("ah_codebook.pb", kind.AH_CENTERS), "wb") as f:
      f.write(assets.ah_codebook.reshape(-1)[0])
  if assets.has_tree:
    with open(add("serialized_partitioner.pb", kind.PARTITIONER), "wb") as f:
      f.write(assets.serialized_partitioner.reshape(-1)[0])
    np.save(add("datapoint_to_token.npy", kind.TOKENIZATION_NPY), assets.datapoint_to_token[rows])
  if assets.has_ah:
    np.save(add("hashed_dataset.npy", kind.AH_DATASET_NPY), assets.hashed_dataset[rows])
  np.save(add("dataset.npy", kind.DATASET_NPY), np.ascontiguousarray(assets.dataset[rows]))
  with open(os.path.join(directory, "scann_assets.pbtxt"), "w") as f:
    f.write(str(manifest))


def encode_rows(assets: ScannAssets, vectors: np.ndarray, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Tokens and AH codes ScaNN gives `vectors` under the trained partitioner and codebook of `assets`.

  Returns:
    int32 [M] tokens (empty without a tree) and uint8 [M, blocks] codes (empty without AH).
  """
  vectors = np.ascontiguousarray(vectors, dtype=np.float32)
  if not (assets.has_tree or assets.has_ah) or not len(vectors):
    blocks = assets.hashed_dataset.shape[1] if assets.has_ah else 0
    return np.zeros([0], np.int32), np.zeros([0, blocks], np.uint8)
  if vectors.shape[1:] != assets.dataset.shape[1:]:
    raise ValueError(f"vectors of shape {vectors.shape} for an index of {assets.dataset.shape[1]} dimensions")
  _, scann_ops_pybind = _pybind()
  with tempfile.TemporaryDirectory(prefix="scann-update-") as directory:
    seed, out = os.path.join(directory, "seed"), os.path.join(directory, "out")
    os.makedirs(seed)
    os.makedirs(out)
    # One seed row: a searcher must hold a datapoint; the trained assets are what matters.
    _write_artifacts(seed, assets, slice(0, 1))
    searcher = scann_ops_pybind.load_searcher(seed, assets_backcompat_shim=False)
    searcher.searcher.upsert([None] * len(vectors), vectors, batch_size)
    searcher.serialize(out)
    tokens = np.load(os.path.join(out, "datapoint_to_token.npy"))[1:] if assets.has_tree else np.zeros([0], np.int32)
    codes = np.load(os.path.join(out, "hashed_dataset.npy"))[1:] if assets.has_ah else np.zeros([0, 0], np.uint8)
  if assets.has_tree and tokens.shape != (len(vectors),):
    raise RuntimeError(f"ScaNN returned {tokens.shape} tokens for {len(vectors)} rows")
  return tokens.astype(np.int32, copy=False), codes


def update(assets: ScannAssets, embeddings: np.ndarray, source_rows: np.ndarray) -> ScannAssets:
  """The assets of an index over `embeddings`, reusing `assets`' training.

  Args:
    assets: the assets of the index being updated.
    embeddings: float32 [N', d], every row of the new catalog.
    source_rows: int [N']: the row of `assets` holding new row i unchanged, or -1 for a new or changed
      row (encoded anew).
  """
  assets.check_updatable()
  source_rows = np.asarray(source_rows, dtype=np.int64)
  if source_rows.shape != (embeddings.shape[0],):
    raise ValueError(f"{source_rows.shape[0]} source rows for {embeddings.shape[0]} embeddings")
  if source_rows.size and source_rows.max() >= assets.num_rows:
    raise ValueError(f"source row {source_rows.max()} is outside the index's {assets.num_rows} rows")
  kept = source_rows >= 0
  fresh = np.flatnonzero(~kept)
  tokens, codes = encode_rows(assets, embeddings[fresh])

  def splice(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    if not _present(old):
      return old
    out = np.empty((len(source_rows),) + old.shape[1:], old.dtype)
    out[kept] = old[source_rows[kept]]
    out[fresh] = new
    return out

  return dataclasses.replace(
    assets,
    datapoint_to_token=splice(assets.datapoint_to_token, tokens),
    hashed_dataset=splice(assets.hashed_dataset, codes),
    dataset=np.ascontiguousarray(embeddings, dtype=np.float32),
  )


class _AssetsSearcher:
  """What `ScannIndex` needs from a built searcher: its assets by name (as a `ScannState` has them)."""

  def __init__(self, assets: ScannAssets):
    self._assets = assets

  def serialize_to_module(self) -> ScannAssets:
    return self._assets


def index_from_assets(
  assets: ScannAssets, config: dict[str, Any], eligible: np.ndarray | None = None
) -> scann_index.ScannIndex:
  """A `ScannIndex` over updated assets, searched with `config`'s knobs (no training, no tuning)."""
  return scann_index.ScannIndex(_AssetsSearcher(assets), assets.dataset, config, eligible)
