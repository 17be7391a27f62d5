"""fgr-prepare: shards read back equal the source, byte-identical on a rerun, and resumable."""

import json
import os

import numpy as np
import pytest

from models.data import prepare, sources, tfrecord

SPEC = sources.DataSpec(
  name="synthetic", synthetic={"num_ads": 1000, "num_users": 100, "num_sessions": 1500, "seed": 3}
)


def _concat(batches):
  batches = list(batches)
  return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def _shard_bytes(output_dir):
  out = {}
  for root, _, files in os.walk(output_dir):
    for name in files:
      if name.endswith(".tfrecord.gz"):
        with open(os.path.join(root, name), "rb") as f:
          out[os.path.relpath(os.path.join(root, name), output_dir)] = f.read()
  return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  output_dir = str(tmp_path_factory.mktemp("prepared"))
  prepare.prepare(SPEC, output_dir, records_per_shard=700, progress=False)
  return output_dir


def test_examples_and_catalog_read_back_equal_the_source(prepared):
  source = sources.open_source(SPEC)
  read = sources.open_source(sources.DataSpec(name="tfrecord", data_dir=prepared))
  for split in ("train", "test"):
    expected, actual = _concat(source.examples(split)), _concat(read.examples(split))
    assert set(actual) == set(expected)
    for name in expected:
      np.testing.assert_array_equal(actual[name], expected[name], err_msg=f"{split}/{name}")
    assert read.num_examples(split) == len(expected["ad_id"])
  rows = np.arange(source.num_items)
  for name, values in source.features(rows).items():
    np.testing.assert_array_equal(read.features(rows)[name], values)
  assert read.row_of("ad17") == 17 and read.num_items == source.num_items
  np.testing.assert_array_equal(read.items_added_after_training(), source.items_added_after_training())

  manifest = tfrecord.read_manifest(prepared)
  train = manifest["splits"]["train"]
  assert [shard["count"] for shard in train["shards"][:-1]] == [700] * (len(train["shards"]) - 1)
  assert sum(shard["count"] for shard in train["shards"]) == train["count"]
  assert manifest["split_boundary"]["num_train_sessions"] == source.num_train_sessions
  assert sources.DataSpec.from_json(manifest["source"]) == SPEC


def test_training_batches_parse_in_the_graph(prepared):
  read = tfrecord.TFRecordSource(prepared)
  batch = next(iter(read.training_dataset(batch_size=64, shuffle_buffer=1000, seed=0)))
  assert set(batch) == set(tfrecord.TRAINING_FEATURES)
  assert batch["hist_ids"].shape == (64, 20) and batch["ad_id"].shape == (64,)


def test_a_rerun_is_byte_identical_and_resumes_after_the_shards_already_written(prepared, tmp_path):
  output_dir = str(tmp_path / "again")
  prepare.prepare(SPEC, output_dir, records_per_shard=700, progress=False)
  expected = _shard_bytes(prepared)
  assert _shard_bytes(output_dir) == expected and len(expected) > 3

  # A run killed after its first shards: later shards, a temporary file and the manifest are missing.
  written = sorted(path for path in expected if path.startswith("train/"))
  for path in written[2:] + ["test/test-00000.tfrecord.gz"]:
    os.remove(os.path.join(output_dir, path))
  os.remove(os.path.join(output_dir, tfrecord.MANIFEST))
  with open(os.path.join(output_dir, written[2] + ".tmp"), "wb") as f:
    f.write(b"partial")
  kept = {path: os.stat(os.path.join(output_dir, path)).st_mtime_ns for path in written[:2]}
  prepare.prepare(SPEC, output_dir, records_per_shard=700, progress=False)
  assert _shard_bytes(output_dir) == expected
  assert {path: os.stat(os.path.join(output_dir, path)).st_mtime_ns for path in kept} == kept  # Not rewritten.
  with open(os.path.join(prepared, tfrecord.MANIFEST)) as a, open(os.path.join(output_dir, tfrecord.MANIFEST)) as b:
    assert json.load(a) == json.load(b)


def test_bad_input_gets_a_clear_error(prepared, tmp_path):
  other = sources.DataSpec(name="synthetic", synthetic={**SPEC.synthetic, "seed": 4})
  with pytest.raises(ValueError, match="preparation of other data"):
    prepare.prepare(other, prepared, records_per_shard=700, progress=False)
  with pytest.raises(FileNotFoundError, match="run fgr-prepare there first"):
    tfrecord.TFRecordSource(str(tmp_path))
  with pytest.raises(ValueError, match="keeps the split"):
    sources.open_source(sources.DataSpec(name="tfrecord", data_dir=prepared, split="leave_last_out"))
