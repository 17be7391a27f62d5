"""fgr-prepare: shards read back equal the source, byte-identical on a rerun, resumable, and checked when read."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from models.data import logs, prepare, sources, tfrecord

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
  assert read.bids(rows).dtype == np.float32
  np.testing.assert_array_equal(read.bids(rows), source.bids(rows))
  assert tfrecord.BID not in read.features(rows)
  test = _concat(read.examples("test"))
  assert test["bid"].dtype == np.float32 and test["query_category"].dtype == object

  manifest = tfrecord.read_manifest(prepared)
  train = manifest["splits"]["train"]
  assert [shard["count"] for shard in train["shards"][:-1]] == [700] * (len(train["shards"]) - 1)
  assert sum(shard["count"] for shard in train["shards"]) == train["count"]
  assert manifest["split_boundary"]["num_train_sessions"] == source.num_train_sessions
  assert sources.DataSpec.from_json(manifest["source"]) == SPEC
  for split in ("train", "test"):
    layout = manifest["splits"][split]["layout"]
    assert layout["bid"] == {"width": 0, "kind": "float"} and layout["query_category"] == {"width": 0, "kind": "bytes"}
  assert manifest[tfrecord.CATALOG]["layout"][tfrecord.BID] == {"width": 0, "kind": "float"}


def _write_logs(data_dir, with_money):
  os.makedirs(data_dir)
  with open(os.path.join(data_dir, logs.ITEMS_FILE), "w") as f:
    for i in range(4):
      f.write(json.dumps({"ad_id": f"a{i}", **({"bid": 0.5 * i} if with_money and i else {})}) + "\n")
  with open(os.path.join(data_dir, logs.EVENTS_FILE), "w") as f:
    for t in range(10):
      event = "conversion" if with_money and t % 3 == 0 else "click"
      f.write(json.dumps({"user_id": f"u{t % 2}", "timestamp": t, "ad_id": f"a{t % 4}", "event": event}) + "\n")


@pytest.mark.parametrize("with_money", [True, False])
def test_logs_bids_and_conversions_round_trip_and_their_absence_too(tmp_path, with_money):
  _write_logs(str(tmp_path / "logs"), with_money)
  spec = sources.DataSpec(name="logs", data_dir=str(tmp_path / "logs"))
  prepare.prepare(spec, str(tmp_path / "prepared"), records_per_shard=4, progress=False)
  source = sources.open_source(spec)
  read = sources.open_source(sources.DataSpec(name="tfrecord", data_dir=str(tmp_path / "prepared")))
  rows = np.arange(4)
  if with_money:
    np.testing.assert_array_equal(sources.bids_of(read, rows), np.array([0, 0.5, 1, 1.5], dtype=np.float32))
  else:
    assert sources.bids_of(read, rows) is None and sources.bids_of(source, rows) is None
  for split in ("train", "test"):
    expected, actual = _concat(source.examples(split)), _concat(read.examples(split))
    assert set(actual) == set(expected)
    assert {"bid", "converted"} & set(actual) == ({"bid", "converted"} if with_money else set())
    for name in expected:
      np.testing.assert_array_equal(actual[name], expected[name], err_msg=f"{split}/{name}")


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


def test_another_process_writes_the_same_bytes(prepared, tmp_path):
  # Within one process the protobuf feature map always comes out in the same order; across processes
  # it did not (serialized without deterministic=True), so every shard's bytes differed.
  output_dir = str(tmp_path / "elsewhere")
  script = (
    "from models.data import prepare, sources; "
    f"prepare.prepare(sources.DataSpec.from_json({SPEC.to_json()!r}), {output_dir!r}, 700, progress=False)"
  )
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "PYTHONHASHSEED": "12345", "TF_CPP_MIN_LOG_LEVEL": "3"}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _shard_bytes(output_dir) == _shard_bytes(prepared)


def test_bad_input_gets_a_clear_error(prepared, tmp_path):
  other = sources.DataSpec(name="synthetic", synthetic={**SPEC.synthetic, "seed": 4})
  with pytest.raises(ValueError, match="preparation of other data"):
    prepare.prepare(other, prepared, records_per_shard=700, progress=False)
  with pytest.raises(FileNotFoundError, match="run fgr-prepare there first"):
    tfrecord.TFRecordSource(str(tmp_path))
  with pytest.raises(ValueError, match="keeps the split"):
    sources.open_source(sources.DataSpec(name="tfrecord", data_dir=prepared, split="leave_last_out"))


def _copy(prepared, tmp_path):
  output_dir = str(tmp_path / "copy")
  shutil.copytree(prepared, output_dir)
  return output_dir


def _manifest(output_dir):
  with open(os.path.join(output_dir, tfrecord.MANIFEST)) as f:
    return json.load(f)


def test_a_rerun_over_changed_logs_is_refused_and_leaves_the_output_as_it_was(tmp_path):
  logs_dir, output_dir = str(tmp_path / "logs"), str(tmp_path / "prepared")
  _write_logs(logs_dir, with_money=False)
  spec = sources.DataSpec(name="logs", data_dir=logs_dir)
  prepare.prepare(spec, output_dir, records_per_shard=4, progress=False)
  shards, manifest = _shard_bytes(output_dir), _manifest(output_dir)
  assert set(manifest["inputs"]) == {logs.ITEMS_FILE, logs.EVENTS_FILE}

  # A day more of logs moves the split: the old test shard holds events the new split trains on.
  events = os.path.join(logs_dir, logs.EVENTS_FILE)
  with open(events) as f:
    original = f.read()
  with open(events, "a") as f:
    f.write("".join(json.dumps({"user_id": "u1", "timestamp": t, "ad_id": "a1"}) + "\n" for t in range(10, 20)))
  with pytest.raises(
    ValueError, match=r"other input: events.jsonl changed since \(events.jsonl: \d+ bytes then, \d+ now"
  ):
    prepare.prepare(spec, output_dir, records_per_shard=4, progress=False)
  assert _shard_bytes(output_dir) == shards and _manifest(output_dir) == manifest

  # The fingerprint is the content: the same bytes written again (a new mtime) resume.
  with open(events, "w") as f:
    f.write(original)
  os.utime(events, (1, 1))
  prepare.prepare(spec, output_dir, records_per_shard=4, progress=False)
  assert _shard_bytes(output_dir) == shards and _manifest(output_dir) == manifest


def test_a_failed_first_run_does_not_claim_the_directory_for_its_bad_input(tmp_path):
  logs_dir, output_dir = str(tmp_path / "logs"), str(tmp_path / "prepared")
  _write_logs(logs_dir, with_money=False)
  events = os.path.join(logs_dir, logs.EVENTS_FILE)
  with open(events) as f:
    good = f.read()
  with open(events, "a") as f:
    f.write('{"timestamp": 99, "ad_id": "nope"}\n')
  spec = sources.DataSpec(name="logs", data_dir=logs_dir)
  with pytest.raises(ValueError, match="events.jsonl:11: ad_id 'nope' is not in items.jsonl"):
    prepare.prepare(spec, output_dir, records_per_shard=4, progress=False)
  with open(events, "w") as f:
    f.write(good)  # The fixed logs are not "other input" to the rerun.
  prepare.prepare(spec, output_dir, records_per_shard=4, progress=False)


def test_logs_written_to_while_they_are_prepared_leave_no_manifest_and_no_output_to_resume(tmp_path, monkeypatch):
  """Events appended after the source counted them went to the test shards, under a manifest vouching
  for the longer file: a rerun then kept those test shards beside a split drawn at the new count."""
  logs_dir, output_dir = str(tmp_path / "logs"), str(tmp_path / "prepared")
  _write_logs(logs_dir, with_money=False)
  events = os.path.join(logs_dir, logs.EVENTS_FILE)
  open_source = sources.open_source

  def opened_then_appended(spec):
    source = open_source(spec)
    with open(events, "a") as f:  # The writer of the log adds a day more once the source has counted.
      f.write("".join(json.dumps({"user_id": "u1", "timestamp": t, "ad_id": "a1"}) + "\n" for t in range(10, 20)))
    return source

  monkeypatch.setattr(prepare.sources, "open_source", opened_then_appended)
  spec = sources.DataSpec(name="logs", data_dir=logs_dir)
  with pytest.raises(ValueError, match=r"events.jsonl changed while fgr-prepare read it, .* an empty --output_dir"):
    prepare.prepare(spec, output_dir, records_per_shard=4, progress=False)
  monkeypatch.undo()
  assert not os.path.exists(os.path.join(output_dir, tfrecord.MANIFEST))
  with pytest.raises(ValueError, match=r"other input: events.jsonl changed since"):
    prepare.prepare(spec, output_dir, records_per_shard=4, progress=False)
  manifest = prepare.prepare(spec, str(tmp_path / "empty"), records_per_shard=4, progress=False)
  assert {split: manifest["splits"][split]["count"] for split in ("train", "test")} == {"train": 18, "test": 2}


def test_logs_at_a_url_are_read_as_local_ones(tmp_path):
  """--data_dir is any path tf.io.gfile opens (README, "Where data lives"); logs there were "missing"."""
  _write_logs(str(tmp_path / "logs"), with_money=True)
  url = f"ram://{tmp_path.name}/logs"  # TensorFlow's in-memory file system stands for gs:// and the like.
  tf.io.gfile.makedirs(url)
  for name in (logs.ITEMS_FILE, logs.EVENTS_FILE):
    tf.io.gfile.copy(str(tmp_path / "logs" / name), f"{url}/{name}")
  local, remote = (
    sources.DataSpec(name="logs", data_dir=str(tmp_path / "logs")),
    sources.DataSpec(name="logs", data_dir=url),
  )
  for split in ("train", "test"):
    expected, actual = (
      _concat(sources.open_source(local).examples(split)),
      _concat(sources.open_source(remote).examples(split)),
    )
    assert set(actual) == set(expected)
    for name in expected:
      np.testing.assert_array_equal(actual[name], expected[name], err_msg=f"{split}/{name}")
  manifest = prepare.prepare(remote, str(tmp_path / "prepared"), records_per_shard=4, progress=False)
  assert manifest["inputs"] == prepare.input_fingerprint(local)

  # The same clear errors as on local disk, a line past the limit included.
  with tf.io.gfile.GFile(f"{url}/{logs.EVENTS_FILE}", "ab") as f:
    f.write(b'{"timestamp": 99, "ad_id": "' + b"a" * logs.MAX_LINE_BYTES + b'"}\n')
  with pytest.raises(ValueError, match=r"logs/events.jsonl:11: line longer than 1,048,576 bytes"):
    sources.open_source(remote)
  tf.io.gfile.remove(f"{url}/{logs.ITEMS_FILE}")
  with pytest.raises(FileNotFoundError, match=r"logs/items.jsonl is missing"):
    sources.open_source(remote)
  tf.io.gfile.makedirs(f"{url}/{logs.ITEMS_FILE}")
  with pytest.raises(ValueError, match=r"logs/items.jsonl is not a file"):
    sources.open_source(remote)


def test_too_few_events_for_a_test_split_claim_nothing_and_say_how_many(tmp_path):
  """It wrote the spec and a training shard before finding the test split empty, and then refused the
  rerun with more events as "a preparation of other input"."""
  logs_dir, output_dir = str(tmp_path / "logs"), str(tmp_path / "prepared")
  _write_logs(logs_dir, with_money=False)
  events = os.path.join(logs_dir, logs.EVENTS_FILE)
  with open(events) as f:
    lines = f.readlines()
  with open(events, "w") as f:
    f.writelines(lines[:4])  # round(4 * 0.9) = 4 events before the test split: none after it.
  spec = sources.DataSpec(name="logs", data_dir=logs_dir)
  with pytest.raises(ValueError, match=r"The source yields no test examples: .*events.jsonl holds 4 events"):
    prepare.prepare(spec, output_dir, records_per_shard=4, progress=False)
  with open(events, "w") as f:
    f.writelines(lines)
  prepare.prepare(spec, output_dir, records_per_shard=4, progress=False)


def test_a_rerun_rewrites_damaged_shards_and_has_no_manifest_until_it_ends(prepared, tmp_path, monkeypatch):
  output_dir = _copy(prepared, tmp_path)
  expected = _shard_bytes(prepared)
  truncated, corrupt = (os.path.join(output_dir, f"train/train-0000{i}.tfrecord.gz") for i in (1, 2))
  with open(truncated, "r+b") as f:
    f.truncate(len(expected["train/train-00001.tfrecord.gz"]) // 2)
  _flip_bytes(corrupt)

  def interrupted(source):
    raise RuntimeError("killed")

  monkeypatch.setattr(prepare, "_catalog_batches", interrupted)
  with pytest.raises(RuntimeError, match="killed"):
    prepare.prepare(SPEC, output_dir, records_per_shard=700, progress=False)
  assert not os.path.exists(os.path.join(output_dir, tfrecord.MANIFEST))  # Nothing takes it for complete.
  monkeypatch.undo()
  prepare.prepare(SPEC, output_dir, records_per_shard=700, progress=False)
  assert _shard_bytes(output_dir) == expected and _manifest(output_dir) == _manifest(prepared)


def _flip_bytes(path):
  """Corrupts the middle of a file, keeping its size."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    f.seek(0)
    f.write(data)


def test_a_damaged_shard_is_an_error_naming_it(prepared, tmp_path):
  output_dir = _copy(prepared, tmp_path)
  shard = os.path.join(output_dir, "train/train-00001.tfrecord.gz")
  with open(shard, "rb") as f:
    data = f.read()

  # Truncated: refused when the source opens, by its size, before any training.
  with open(shard, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match=rf"train-00001.tfrecord.gz is damaged: it is {len(data) // 2} bytes, manifest"):
    tfrecord.TFRecordSource(output_dir)

  # Corrupt at the same size: the reader that meets it names it, rather than a bare DataLossError.
  with open(shard, "wb") as f:
    f.write(data)
  _flip_bytes(shard)
  read = tfrecord.TFRecordSource(output_dir)
  with pytest.raises(ValueError, match=r"train-00001.tfrecord.gz is damaged: it does not decode: .*rerun the same"):
    list(read.examples("train"))
  with pytest.raises(ValueError, match=r"train-00001.tfrecord.gz is damaged: it does not decode"):
    list(read.item_id_batches())

  # Fewer records than the manifest says (where GZIP stops cleanly at a cut), under a manifest that
  # gives no sizes: the split read through is refused, never trained on short.
  records = list(tf.data.TFRecordDataset(os.path.join(prepared, "train/train-00001.tfrecord.gz"), "GZIP"))
  with tf.io.TFRecordWriter(shard, tf.io.TFRecordOptions(compression_type="GZIP")) as writer:
    for record in records[:100]:
      writer.write(record.numpy())
  manifest = _manifest(output_dir)
  for part in (*manifest["splits"].values(), manifest[tfrecord.CATALOG]):
    for entry in part["shards"]:
      del entry["bytes"]
  with open(os.path.join(output_dir, tfrecord.MANIFEST), "w") as f:
    json.dump(manifest, f)
  with pytest.raises(
    ValueError, match=r"train-00001.tfrecord.gz is damaged: it holds 100 records, manifest.json says 700"
  ):
    list(tfrecord.TFRecordSource(output_dir).examples("train"))

  os.remove(shard)
  manifest["splits"]["train"]["shards"][1]["bytes"] = len(data)
  with open(os.path.join(output_dir, tfrecord.MANIFEST), "w") as f:
    json.dump(manifest, f)
  with pytest.raises(FileNotFoundError, match=r"train-00001.tfrecord.gz is missing, though manifest.json lists it"):
    tfrecord.TFRecordSource(output_dir)
