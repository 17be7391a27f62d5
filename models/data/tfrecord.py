"""The data source over fgr-prepare's output: a tf.data pipeline with no Python per example.

Training reads the shards the way tf.data is built to: shard files listed and shuffled, read
interleaved in parallel, serialized records shuffled across shards, batched, parsed by one
vectorised `tf.io.parse_example` per batch, and prefetched. Under `tf.distribute` the file list is
what auto-sharding splits between workers. Everything else a source offers (the catalog, ordered
test batches for evaluation and export) is read back from the same files.

The shards are checked against the manifest: when the source opens, each one's size (a truncated
or replaced shard is refused before training starts); when a split or the catalog is read through,
its record count. A damaged shard is an error naming it, never fewer examples read in silence.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from models.data import json_files, records, schema

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
CATALOG = "catalog"
HELD_OUT = "held_out"  # Catalog column: the item was removed from training (cold-start runs).
ADDED_AFTER_TRAINING = "added_after_training"  # Catalog column: created after the last training day.
BID = "bid"  # Catalog column: the item's bid, when the source has bids.
TRAINING_FEATURES = schema.QUERY_FEATURE_NAMES + schema.ITEM_FEATURE_NAMES
_PLUGIN_SCHEMES = ("s3", "hdfs", "az")  # File systems tensorflow-io registers when it is imported.
_COMPRESSION = "GZIP"
_READ_BATCH = 8192
# Measured on 2 cores (docs/performance.md): a 1 MiB read buffer and 64 records from a shard at a
# time read 2x faster than the defaults (256 KiB, one record per shard in turn).
_READ_BUFFER = 1 << 20
_BLOCK = 64
_STAT_THREADS = 16  # Shard sizes are checked in parallel: one round trip each on remote storage.


def load_file_system(path: str) -> None:
  """Registers tensorflow-io's file systems when `path` needs one (gs:// and local are built in)."""
  scheme = path.split("://", 1)[0] if "://" in path else ""
  if scheme not in _PLUGIN_SCHEMES:
    return
  try:
    import tensorflow_io  # noqa: F401  Importing it registers s3://, hdfs:// and az:// with tf.io.gfile.
  except ImportError:
    raise ValueError(f"{path} needs the tensorflow-io package for {scheme}:// (pip install tensorflow-io)") from None


def read_manifest(data_dir: str) -> dict[str, Any]:
  """The manifest of a complete fgr-prepare output, with a clear error if there is none."""
  load_file_system(data_dir)
  path = os.path.join(data_dir, MANIFEST)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"No {MANIFEST} in {data_dir!r}: run fgr-prepare there first (or let it finish)")
  manifest = json_files.read_json_object(path, remedy="run fgr-prepare again into an empty directory")
  if manifest.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path} is format version {manifest.get('version')}; this build reads {FORMAT_VERSION}")
  return manifest


class TFRecordSource:
  """A `sources.Source` over the shards fgr-prepare wrote to `data_dir`.

  The catalog is loaded into memory (the index embeds all of it anyway); examples stay on disk.

  Args:
    data_dir: fgr-prepare's --output_dir (any `tf.io.gfile` path).
  """

  def __init__(self, data_dir: str):
    self.data_dir = data_dir
    self.manifest = read_manifest(data_dir)
    self._check_sizes()
    catalog = self.manifest[CATALOG]
    layout = records.Layout.from_json(catalog["layout"])
    parts = list(self._read(catalog["shards"], layout))
    self._columns = {name: np.concatenate([part[name] for part in parts]) for name in layout.columns}
    self.num_items = int(catalog["count"])
    self._row_of = {ad_id: row for row, ad_id in enumerate(self._columns[schema.AD_ID].tolist())}
    held_out = self._columns.pop(HELD_OUT, None)
    self.held_out_rows = None if held_out is None else held_out.astype(bool)
    added = self._columns.pop(ADDED_AFTER_TRAINING, None)
    self._added_after_training = None if added is None else added.astype(bool)
    self._bids = self._columns.pop(BID, None)

  # ---- Catalog ----------------------------------------------------------------------------------

  def features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: column[rows] for name, column in self._columns.items()}

  def row_of(self, ad_id: str) -> int:
    if ad_id not in self._row_of:
      raise KeyError(f"{ad_id!r} is not in the catalog of {self.data_dir}")
    return self._row_of[ad_id]

  def items_added_after_training(self) -> np.ndarray | None:
    """bool [num_items] when the prepared source knew it (synthetic logs), else None."""
    return self._added_after_training

  def bids(self, rows: np.ndarray) -> np.ndarray | None:
    """float32 [n] bids of catalog rows when the prepared source had bids, else None."""
    return None if self._bids is None else self._bids[rows]

  # ---- Examples ---------------------------------------------------------------------------------

  def num_examples(self, split: str) -> int:
    return int(self._split(split)["count"])

  def layout(self, split: str) -> records.Layout:
    return records.Layout.from_json(self._split(split)["layout"])

  def files(self, split: str) -> list[str]:
    return [os.path.join(self.data_dir, shard["path"]) for shard in self._split(split)["shards"]]

  def examples(self, split: str, batch_size: int = _READ_BATCH) -> Iterator[dict[str, np.ndarray]]:
    """Batches of a split in the order fgr-prepare wrote them, every column as the source yielded it.

    That includes the source's extras (e.g. the synthetic log's "converted", "day", "bid" and
    "query_category"); `layout(split)` lists them.
    """
    yield from self._read(self._split(split)["shards"], self.layout(split), batch_size)

  def item_id_batches(self, split: str = "train") -> Iterator[dict[str, np.ndarray]]:
    """{AD_ID: [n]} batches of a split, parsing nothing else (for counting item frequencies)."""
    layout = self.layout(split)
    dataset = tf.data.TFRecordDataset(self.files(split), compression_type=_COMPRESSION, num_parallel_reads=4)
    dataset = dataset.batch(65536).map(records.parser(layout, (schema.AD_ID,)), tf.data.AUTOTUNE)
    for batch in self._checked(dataset.prefetch(2).as_numpy_iterator(), self._split(split)["shards"]):
      yield {schema.AD_ID: batch[schema.AD_ID]}

  def training_dataset(
    self, batch_size: int, shuffle_buffer: int, seed: int, extra: tuple[str, ...] = ()
  ) -> tf.data.Dataset:
    """Endless training batches of TRAINING_FEATURES (and `extra` columns); an epoch is `num_examples("train") // batch_size` steps.

    It repeats so that every worker of a distributed run can take the same number of steps whatever
    share of the records its shards hold. Shuffling is in two levels, with the same reach as one
    `shuffle_buffer`-record buffer but at a fraction of its cost: serialized records within a window
    of one batch (drawn from up to 8 shards read at once), then parsed batches, shuffle_buffer /
    batch_size of them.
    """
    files = self.files("train")
    layout = self.layout("train")
    dataset = tf.data.Dataset.list_files(files, shuffle=True, seed=seed)
    dataset = dataset.interleave(
      lambda path: tf.data.TFRecordDataset(path, compression_type=_COMPRESSION, buffer_size=_READ_BUFFER),
      cycle_length=min(len(files), 8),
      block_length=_BLOCK,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=False,
    )
    dataset = dataset.shuffle(batch_size, seed=seed, reshuffle_each_iteration=True).repeat()
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.map(
      records.parser(layout, TRAINING_FEATURES + tuple(extra)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
    )
    dataset = dataset.shuffle(max(1, shuffle_buffer // batch_size), seed=seed, reshuffle_each_iteration=True)
    return dataset.prefetch(tf.data.AUTOTUNE)

  def _split(self, split: str) -> dict[str, Any]:
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return self.manifest["splits"][split]

  def _read(
    self, shards: list[dict[str, Any]], layout: records.Layout, batch_size: int = 65536
  ) -> Iterator[dict[str, np.ndarray]]:
    paths = [os.path.join(self.data_dir, shard["path"]) for shard in shards]
    dataset = tf.data.TFRecordDataset(paths, compression_type=_COMPRESSION).batch(batch_size)
    dataset = dataset.map(records.parser(layout), tf.data.AUTOTUNE)
    for parsed in self._checked(dataset.prefetch(2), shards):
      yield records.to_numpy(parsed, layout)

  def _checked(self, batches: Iterable[dict[str, Any]], shards: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The batches read from `shards`, with a damaged shard raised as an error naming it.

    A shard that does not decode, or that held fewer records than the manifest says (GZIP can stop
    cleanly where a file was cut), ends the reading with a ValueError once it is found.
    """
    iterator, read = iter(batches), 0
    while True:
      try:
        batch = next(iterator)
      except StopIteration:
        break
      except tf.errors.DataLossError as e:
        raise self._damaged(shards, e) from None
      read += len(batch[schema.AD_ID])
      yield batch
    if read != sum(int(shard["count"]) for shard in shards):
      raise self._damaged(shards, None)

  def _damaged(self, shards: list[dict[str, Any]], error: tf.errors.DataLossError | None) -> ValueError:
    """The error naming the first of `shards` that does not read back as the manifest says.

    Only called once reading has failed, so reading each shard alone again costs nothing otherwise.
    """
    for shard in shards:
      path = os.path.join(self.data_dir, shard["path"])
      try:
        count = count_records(path)
      except tf.errors.DataLossError as e:
        return _damaged_shard(path, f"it does not decode: {tf_error_reason(e)}")
      if count != int(shard["count"]):
        return _damaged_shard(path, f"it holds {count} records, {MANIFEST} says {shard['count']}")
    reason = tf_error_reason(error) if error is not None else "fewer records than the manifest says"
    return ValueError(f"The shards of {self.data_dir} do not read back ({reason}): run fgr-prepare again")

  def _check_sizes(self) -> None:
    """Refuses a shard that is missing or not the size the manifest gives (manifests that give one)."""
    shards = [shard for part in (*self.manifest["splits"].values(), self.manifest[CATALOG]) for shard in part["shards"]]
    shards = [shard for shard in shards if "bytes" in shard]
    paths = [os.path.join(self.data_dir, shard["path"]) for shard in shards]
    with concurrent.futures.ThreadPoolExecutor(min(_STAT_THREADS, max(1, len(paths)))) as pool:
      sizes = list(pool.map(_size_or_none, paths))
    for shard, path, size in zip(shards, paths, sizes):
      if size is None:
        raise FileNotFoundError(f"{path} is missing, though {MANIFEST} lists it: run fgr-prepare again to rewrite it")
      if size != int(shard["bytes"]):
        raise _damaged_shard(path, f"it is {size} bytes, {MANIFEST} says {shard['bytes']} (truncated or replaced)")


def count_records(path: str) -> int:
  """The records a shard reads back (raises DataLossError where it does not decode)."""
  return int(tf.data.TFRecordDataset(path, compression_type=_COMPRESSION).reduce(np.int64(0), lambda n, _: n + 1))


def tf_error_reason(error: BaseException) -> str:
  """The line of a TensorFlow error that says what went wrong, without its op and node decorations."""
  lines = []
  for line in str(error).splitlines():
    line = re.sub(r"\{\{function_node [^}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]( name: \S*)?", "", line).strip()
    if line and not line.startswith(("Graph execution error", "Detected at node", "File ")):
      lines.append(line)
  return lines[-1] if lines else type(error).__name__


def _size_or_none(path: str) -> int | None:
  try:
    return tf.io.gfile.stat(path).length
  except tf.errors.NotFoundError:
    return None


def _damaged_shard(path: str, reason: str) -> ValueError:
  return ValueError(f"{path} is damaged: {reason}; rerun the same fgr-prepare command, which rewrites damaged shards")
