"""fgr-prepare's writer: any data source streamed into sharded, GZIP TFRecord files and a manifest.

Training at scale reads the examples many times and on many workers, so the Python work of a
source (parsing logs, computing behaviour sequences in time order) is done once, here, and stored
with each example. The output is:

  <output_dir>/train/train-00000.tfrecord.gz ...   one tf.train.Example per training example
  <output_dir>/test/test-00000.tfrecord.gz ...     the held-out examples
  <output_dir>/catalog/catalog-00000.tfrecord.gz   every item's features, in catalog row order
  <output_dir>/manifest.json                       shards, counts, layouts, split and source

Every column of the source's batches is stored, extras included (a click's "day", "converted",
"bid", "query_category"), and each split's layout in the manifest lists them. The catalog also
holds the bid of each item when the source has bids.

Shards hold a fixed number of records, so the same input gives the same shards byte for byte. Each
shard is written under a temporary name and renamed when complete. The manifest is written last:
its presence means the output is complete. Memory holds one source batch at a time. Paths may be
anything `tf.io.gfile` opens (local, gs://, hdfs://, s3:// with tensorflow-io).

A rerun resumes. The first run records in prepare_spec.json what it prepares: the flags, and a
fingerprint of the input files (each one's size and SHA-256; the synthetic source has none). A
rerun with other flags or over changed input is refused: shards of the old input beside shards of
the new would mix two splits (test events of one in the training shards of the other). A rerun of
the same deletes the manifest first (the output is incomplete until it ends), then keeps each
existing shard only if it reads back whole with the records the stream puts there; it still streams
the source to reach the rest, but does not encode what it keeps. A truncated, corrupt or partial
last shard is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tqdm
from absl import logging

from models.data import json_files, records, schema, sequences, sources, tfrecord

SPEC_FILE = "prepare_spec.json"  # What a partial output was started from, so a rerun cannot mix inputs.
_OPTIONS = tf.io.TFRecordOptions(compression_type="GZIP")
_HASH_CHUNK = 1 << 22


def prepare(
  spec: sources.DataSpec, output_dir: str, records_per_shard: int = 100_000, progress: bool = True
) -> dict[str, Any]:
  """Writes the source `spec` names as TFRecord shards under output_dir; returns the manifest.

  Args:
    spec: the data source, as fgr-train takes it.
    output_dir: where the shards and manifest.json go; a partial earlier run there is resumed.
    records_per_shard: examples (or catalog items) per shard; also fixes where shards split.
    progress: show a progress bar per split on stderr.
  """
  if records_per_shard <= 0:
    raise ValueError(f"records_per_shard must be positive, got {records_per_shard}")
  tfrecord.load_file_system(output_dir)
  # The input is fingerprinted before the source reads it, and again once every shard is written:
  # a file changing in between (a log still being written) gave shards of a split taken from the old
  # count of events and a manifest vouching for the new file, and a rerun then kept shards of both.
  inputs = readable_input_fingerprint(spec)
  # The source checks its input when it opens, before the directory is claimed: a bad line fixed
  # after a failed run is then not "other input" to the rerun.
  source = sources.open_source(spec)
  for split in tfrecord.SPLITS:  # Likewise an empty split: adding events is then no "other input" either.
    if not any(len(next(iter(batch.values()))) for batch in source.examples(split)):
      summary = getattr(source, "events_summary", None)
      raise ValueError(f"The source yields no {split} examples" + (f": {summary}" if summary else ""))
  if inputs is None:
    inputs = input_fingerprint(spec)
  _claim(
    output_dir,
    {
      "source": spec.to_json(),
      "inputs": inputs,
      "records_per_shard": records_per_shard,
      "version": tfrecord.FORMAT_VERSION,
    },
  )
  manifest_path = os.path.join(output_dir, tfrecord.MANIFEST)
  if tf.io.gfile.exists(manifest_path):
    tf.io.gfile.remove(manifest_path)  # Until this run ends, the output is not known to be complete.
  manifest: dict[str, Any] = {
    "version": tfrecord.FORMAT_VERSION,
    "source": spec.to_json(),
    "inputs": inputs,
    "splits": {},
  }
  for split in tfrecord.SPLITS:
    with tqdm.tqdm(desc=split, unit=" examples", unit_scale=True, disable=not progress) as bar:
      batches = _counted(source.examples(split), bar)
      manifest["splits"][split] = _write_shards(batches, output_dir, split, records_per_shard)
  manifest[tfrecord.CATALOG] = _write_shards(_catalog_batches(source), output_dir, tfrecord.CATALOG, records_per_shard)
  manifest["split_boundary"] = _split_boundary(source, spec)
  _, changed = inputs_changed_since(spec, inputs)
  if changed:  # No manifest: the output is not taken for complete, and a rerun over the new input is refused.
    raise ValueError(
      f"{', '.join(changed)} changed while fgr-prepare read it, so its shards may mix two versions of it: "
      "prepare the finished files into an empty --output_dir"
    )
  _write_atomically(manifest_path, json.dumps(manifest, indent=1))
  return manifest


def input_fingerprint(spec: sources.DataSpec) -> dict[str, dict[str, Any]]:
  """{file name: {"bytes": size, "sha256": hex digest}} of the files the source reads.

  A content hash rather than modification times: copying or touching the logs does not change what
  is prepared, and hashing reads a file several times faster than the source parses it.
  """
  fingerprint = {}
  for path in sources.input_files(spec):
    digest, size = hashlib.sha256(), 0
    with tf.io.gfile.GFile(path, "rb") as f:
      while chunk := f.read(_HASH_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    fingerprint[os.path.basename(path)] = {"bytes": size, "sha256": digest.hexdigest()}
  return fingerprint


def changed_inputs(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The file names whose `input_fingerprint` entries differ between `recorded` and `current`."""
  return sorted(name for name in set(recorded) | set(current) if recorded.get(name) != current.get(name))


def readable_input_fingerprint(spec: sources.DataSpec) -> dict[str, dict[str, Any]] | None:
  """`input_fingerprint`, or None for an input missing or unreadable: the source, as it opens, names it
  in its own words."""
  try:
    return input_fingerprint(spec)
  except (tf.errors.OpError, OSError):
    return None


def inputs_changed_since(
  spec: sources.DataSpec, before: dict[str, dict[str, Any]] | None
) -> tuple[dict[str, dict[str, Any]], list[str]]:
  """The input's fingerprint now, and the names of its files changed since `before`.

  For fgr-prepare and fgr-train, which fingerprint before and after the source reads: a file changing
  in between (a log still being written) has its split counted on one version and recorded as another.
  Files that cannot be read now count as changed; `before` None (unreadable then) compares with nothing.
  """
  now = readable_input_fingerprint(spec)
  if now is None:
    return {}, sorted(os.path.basename(path) for path in sources.input_files(spec))
  return now, [] if before is None else changed_inputs(before, now)


def _claim(output_dir: str, spec: dict[str, Any]) -> None:
  """Records what this output is made from, or checks that an earlier run made it from the same."""
  tf.io.gfile.makedirs(output_dir)
  path = os.path.join(output_dir, SPEC_FILE)
  if tf.io.gfile.exists(path):
    existing = json_files.read_json_object(path, remedy="the file is damaged; use an empty directory")
    if existing != spec:
      raise ValueError(f"{output_dir} holds a preparation of {_difference(existing, spec)}; use an empty directory")
    return
  _write_atomically(path, json.dumps(spec, indent=1))


def _difference(existing: dict[str, Any], spec: dict[str, Any]) -> str:
  """What differs between an output's recorded spec and this run's, for the refusal."""
  if {**existing, "inputs": None} != {**spec, "inputs": None}:
    before, now = _leaves({**existing, "inputs": None}), _leaves({**spec, "inputs": None})
    changed = sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))
    what = "data" if all(key.startswith("source.") for key in changed) else "flags"
    values = ", ".join(f"{key.rpartition('.')[2]}: {before.get(key)!r} then, {now.get(key)!r} now" for key in changed)
    return f"other {what} ({values})"
  if "inputs" not in existing:
    return "input that an older fgr-prepare did not fingerprint"
  before, now = existing["inputs"], spec["inputs"]
  changed = sorted(name for name in set(before) | set(now) if before.get(name) != now.get(name))
  sizes = ", ".join(
    f"{name}: {before.get(name, {}).get('bytes', 'no')} bytes then, {now.get(name, {}).get('bytes', 'no')} now"
    for name in changed
  )
  return f"other input: {', '.join(changed)} changed since ({sizes})"


def _leaves(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """A recorded spec's values by dotted key (`source.synthetic.num_ads`), so a refusal names what differs
  rather than printing the whole spec."""
  leaves = {}
  for key, value in spec.items():
    if isinstance(value, dict) and value:
      leaves.update(_leaves(value, f"{prefix}{key}."))
    else:
      leaves[f"{prefix}{key}"] = value
  return leaves


def _counted(batches: Iterable[dict[str, np.ndarray]], bar: tqdm.tqdm) -> Iterator[dict[str, np.ndarray]]:
  for batch in batches:
    yield batch
    bar.update(len(batch[schema.AD_ID]))


def _catalog_batches(source: sources.Source) -> Iterator[dict[str, np.ndarray]]:
  """Catalog features in row order, with the bids, cold-start and freshness flags the source knows."""
  held_out = getattr(source, "held_out_rows", None)
  added = source.items_added_after_training() if hasattr(source, "items_added_after_training") else None
  for rows, features in sequences.iterate_catalog(source):
    batch = {name: features[name] for name in (*schema.ITEM_FEATURE_NAMES, schema.STATUS)}
    bids = sources.bids_of(source, rows)
    if bids is not None:
      batch[tfrecord.BID] = np.asarray(bids, dtype=np.float32)
    if held_out is not None:
      batch[tfrecord.HELD_OUT] = held_out[rows]
    if added is not None:
      batch[tfrecord.ADDED_AFTER_TRAINING] = added[rows]
    yield batch


def _split_boundary(source: sources.Source, spec: sources.DataSpec) -> dict[str, Any]:
  """Where train ends and test begins, as far as the source says."""
  boundary: dict[str, Any] = {"split": spec.split}
  for name in ("num_train_sessions", "last_train_day"):
    if hasattr(source, name):
      boundary[name] = int(getattr(source, name))
  return boundary


def _write_shards(
  batches: Iterable[dict[str, np.ndarray]], output_dir: str, name: str, records_per_shard: int
) -> dict[str, Any]:
  """Streams batches into <name>/<name>-NNNNN.tfrecord.gz shards of records_per_shard records."""
  tf.io.gfile.makedirs(os.path.join(output_dir, name))
  layout: records.Layout | None = None
  shards: list[dict[str, Any]] = []
  writer: _Shard | None = None
  for batch in batches:
    if layout is None:
      layout = records.Layout.of_batch(batch)
    layout.check(batch)
    rows = len(batch[schema.AD_ID])
    start = 0
    while start < rows:
      if writer is None:
        writer = _Shard(output_dir, f"{name}/{name}-{len(shards):05d}.tfrecord.gz", layout, records_per_shard)
      take = min(rows - start, records_per_shard - writer.count)
      writer.add({column: values[start : start + take] for column, values in batch.items()}, take)
      start += take
      if writer.count == records_per_shard:
        shards.append(writer.close())
        writer = None
  if writer is not None:
    shards.append(writer.close())
  if layout is None:
    raise ValueError(f"The source yielded no {name} records")
  return {"shards": shards, "count": sum(shard["count"] for shard in shards), "layout": layout.to_json()}


class _Shard:
  """One output shard: encoded into a temporary file and renamed when complete, or kept if it is.

  A shard already there is kept only when it reads back whole with `records_per_shard` records:
  an earlier run renamed it complete, nothing truncated or corrupted it since, and it is not the
  last, partial shard of a split (cheap to rewrite, and its count is only known at the end).

  Args:
    output_dir: the preparation's root.
    relative_path: the shard's path under it, as the manifest names it.
    layout: the records' columns.
    records_per_shard: the records a full shard holds.
  """

  def __init__(self, output_dir: str, relative_path: str, layout: records.Layout, records_per_shard: int):
    self.relative_path = relative_path
    self.path = os.path.join(output_dir, relative_path)
    self.layout = layout
    self.count = 0
    self._writer = None
    if not _is_complete(self.path, records_per_shard):
      self._writer = tf.io.TFRecordWriter(self.path + ".tmp", _OPTIONS)

  def add(self, batch: dict[str, np.ndarray], rows: int) -> None:
    if self._writer is not None:
      for record in records.encode(batch, self.layout):
        self._writer.write(record)
    self.count += rows

  def close(self) -> dict[str, Any]:
    if self._writer is not None:
      self._writer.close()
      tf.io.gfile.rename(self.path + ".tmp", self.path, overwrite=True)
    return {"path": self.relative_path, "count": self.count, "bytes": tf.io.gfile.stat(self.path).length}


def _is_complete(path: str, records_per_shard: int) -> bool:
  """Whether the shard at `path` exists and reads back whole with `records_per_shard` records."""
  if not tf.io.gfile.exists(path):
    return False
  try:
    count = tfrecord.count_records(path)
  except tf.errors.DataLossError as e:
    logging.warning("Rewriting %s: it does not read back (%s)", path, str(e).splitlines()[0])
    return False
  return count == records_per_shard  # Fewer: truncated where GZIP stops cleanly, or a split's last shard.


def _write_atomically(path: str, text: str) -> None:
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    f.write(text)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
