"""MovieLens-100K under the TFRS protocol, and the generic log format."""

import json

import numpy as np
import pytest
import tensorflow as tf

from export import refresh_delta
from models.data import logs, movielens, schema
from tests.data import logs_testlib
from tests.data.logs_testlib import write_jsonl


def test_movielens_split_follows_the_tfrs_protocol_without_leaking_labels(movielens_dir):
  data = movielens.MovieLens100K(movielens_dir)
  train = {
    k: np.concatenate([b[k] for b in data.examples("train")])
    for k in schema.ITEM_FEATURE_NAMES + schema.QUERY_FEATURE_NAMES
  }
  test = {
    k: np.concatenate([b[k] for b in data.examples("test")])
    for k in schema.ITEM_FEATURE_NAMES + schema.QUERY_FEATURE_NAMES
  }
  assert len(train[schema.AD_ID]) == 80_000 and len(test[schema.AD_ID]) == 20_000
  assert data.num_items == 1682
  # No test rating may appear in any behaviour sequence: histories are built from training ratings.
  test_pairs = set(zip(test[schema.USER_ID], test[schema.AD_ID]))
  for split in (train, test):
    for user, hist in zip(split[schema.USER_ID], split[schema.HIST_IDS]):
      assert not any((user, h) in test_pairs for h in hist if h)
  # The most recent history item plays the query.
  with_history = test[schema.HIST_IDS][:, 0] != ""
  assert np.all(
    test[schema.QUERY_TOKENS][with_history, 0]
    == np.char.add("item:", test[schema.HIST_IDS][with_history, 0].astype(str))
  )


def test_generic_logs_build_sequences_and_split_in_time(tmp_path):
  write_jsonl(
    tmp_path / "items.jsonl",
    [
      {"ad_id": "a1", "category": "shoes", "brand": "acme", "tokens": ["running", "shoes"]},
      {"ad_id": "a2", "category": "phones", "brand": "zed", "tokens": ["phone"], "status": "paused"},
    ],
  )
  write_jsonl(
    tmp_path / "events.jsonl",
    [
      {"user_id": "u1", "timestamp": t, "user_features": ["age:25-34"], "query_tokens": ["running"], "ad_id": a}
      for t, a in enumerate(["a1", "a2", "a1", "a2", "a1"])
    ],
  )
  data = logs.LogsDataset(str(tmp_path), test_fraction=0.2)
  train = next(data.examples("train"))
  test = next(data.examples("test"))
  assert len(train[schema.AD_ID]) == 4 and len(test[schema.AD_ID]) == 1
  assert list(test[schema.HIST_IDS][0][:4]) == ["a2", "a1", "a2", "a1"]
  assert list(data.features(np.array([1]))[schema.STATUS]) == ["paused"]


@pytest.mark.parametrize(
  "events,message",
  [
    ([{"user_id": "u", "timestamp": 2, "ad_id": "a1"}, {"user_id": "u", "timestamp": 1, "ad_id": "a1"}], "sorted"),
    ([{"user_id": "u", "timestamp": 1, "ad_id": "nope"}], "not in items.jsonl"),
    ([{"user_id": "u", "timestamp": 1, "ad_id": "a1", "query_tokens": "not-a-list"}], "list of strings"),
    # NaN compares false with everything: accepted, it let the next line go back in time unnoticed.
    (
      [{"timestamp": 5, "ad_id": "a1"}, {"timestamp": float("nan"), "ad_id": "a1"}, {"timestamp": 1, "ad_id": "a1"}],
      r"events.jsonl:2: 'timestamp' must be a finite number, got nan",
    ),
    ([{"timestamp": True, "ad_id": "a1"}], r"events.jsonl:1: 'timestamp' must be a finite number, got True"),
  ],
)
def test_generic_logs_reject_bad_input_with_the_line_number(tmp_path, events, message):
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "a1"}])
  write_jsonl(tmp_path / "events.jsonl", events)
  with pytest.raises(ValueError, match=message):
    list(logs.LogsDataset(str(tmp_path)).examples("train"))


def test_generic_logs_carry_bids_and_conversions_when_logged(tmp_path):
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "a1", "bid": 2}, {"ad_id": "a2"}, {"ad_id": "a3", "bid": 0.25}])
  events = [
    {"user_id": "u1", "timestamp": t, "ad_id": a, "event": e}
    for t, (a, e) in enumerate([("a1", "click"), ("a1", "conversion"), ("a2", "click"), ("a3", "click")])
  ]
  write_jsonl(tmp_path / "events.jsonl", events)
  data = logs.LogsDataset(str(tmp_path), test_fraction=0.25)
  np.testing.assert_array_equal(data.bids(np.array([2, 1, 0])), np.array([0.25, 0.0, 2.0], dtype=np.float32))
  train = next(data.examples("train"))
  assert train["bid"].dtype == np.float32 and list(train["bid"]) == [2.0, 2.0, 0.0]
  assert list(train["converted"]) == [False, True, False]
  test = next(data.examples("test"))
  assert list(test["bid"]) == [0.25] and list(test["converted"]) == [False]

  # Without any bid or conversion, the source says so and batches keep only the usual fields.
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "a1"}, {"ad_id": "a2"}, {"ad_id": "a3"}])
  write_jsonl(tmp_path / "events.jsonl", [{**e, "event": "click"} for e in events])
  plain = logs.LogsDataset(str(tmp_path), test_fraction=0.25)
  assert plain.bids(np.array([0])) is None and not plain.has_conversions
  assert "bid" not in next(plain.examples("train")) and "converted" not in next(plain.examples("train"))


# 1e39 and 10**39 are finite to JSON but not to float32, which bids are stored as: they became inf, and
# the value objective's loss NaN.
@pytest.mark.parametrize("bid", [-1, "3", True, float("inf"), 1e39, 10**39])
def test_generic_logs_reject_a_bad_bid_with_the_line_number(tmp_path, bid):
  (tmp_path / "items.jsonl").write_text('{"ad_id": "a1", "bid": 1}\n' + json.dumps({"ad_id": "a2", "bid": bid}) + "\n")
  write_jsonl(tmp_path / "events.jsonl", [{"timestamp": 1, "ad_id": "a1"}])
  with pytest.raises(ValueError, match=r"items.jsonl:2: 'bid' must be a non-negative number"):
    logs.LogsDataset(str(tmp_path))


def test_the_largest_float32_bid_is_kept_as_it_is(tmp_path):
  largest = float(np.finfo(np.float32).max)
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "a1", "bid": largest}, {"ad_id": "a2", "bid": 0}])
  write_jsonl(tmp_path / "events.jsonl", [{"timestamp": 1, "ad_id": "a1"}])
  assert logs.LogsDataset(str(tmp_path)).bids(np.array([0, 1])).tolist() == [largest, 0.0]


def test_events_without_a_user_id_have_no_history_and_enter_none(tmp_path):
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": f"a{i}"} for i in range(4)])
  users = [None, "", "u1", "absent", None, "u1"]
  events = [
    {"timestamp": t, "ad_id": f"a{t % 4}", **({} if user == "absent" else {"user_id": user})}
    for t, user in enumerate(users)
  ]
  write_jsonl(tmp_path / "events.jsonl", events)
  # Chunks of 4 events: anonymous events meet both inside a chunk and across chunks.
  batches = logs.LogsDataset(str(tmp_path), test_fraction=0.0).examples("train", chunk_size=4)
  histories = [[h for h in hist if h] for batch in batches for hist in batch[schema.HIST_IDS]]
  # Only u1's second event has a history: its own first click, none of the anonymous ones.
  assert histories == [[], [], [], [], [], ["a2"]]


@pytest.mark.parametrize("field,value", [("category", 7), ("category", None), ("brand", ["x"]), ("tokens", "x")])
def test_a_catalog_line_obeys_the_type_rules_of_a_delta_line(tmp_path, field, value):
  line = {"ad_id": "a2", field: value}
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "a1"}, line])
  write_jsonl(tmp_path / "events.jsonl", [{"timestamp": 1, "ad_id": "a1"}])
  with pytest.raises(ValueError, match=rf"items.jsonl:2: '{field}' must be a") as in_catalog:
    logs.LogsDataset(str(tmp_path))
  with pytest.raises(ValueError, match=r"delta.jsonl:1: ") as in_delta:
    refresh_delta.parse_lines([json.dumps(line)], "delta.jsonl")
  assert str(in_catalog.value).partition(": ")[2] == str(in_delta.value).partition(": ")[2]


def test_a_duplicated_ad_id_is_reported_with_the_file_and_both_lines(tmp_path):
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "a1"}, {"ad_id": "a2"}, {"ad_id": "a3"}, {"ad_id": "a2"}])
  write_jsonl(tmp_path / "events.jsonl", [{"timestamp": 1, "ad_id": "a1"}])
  with pytest.raises(ValueError, match=r"items.jsonl:4: ad_id 'a2' is already on line 2; ad ids must be unique"):
    logs.LogsDataset(str(tmp_path))


@pytest.mark.parametrize("bad_file", ["items.jsonl", "events.jsonl"])
def test_bytes_that_are_not_utf8_are_reported_with_the_file_and_line(tmp_path, bad_file):
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "a1"}, {"ad_id": "a2"}])
  write_jsonl(tmp_path / "events.jsonl", [{"timestamp": t, "ad_id": "a1"} for t in range(3)])
  path = tmp_path / bad_file
  lines = path.read_bytes().splitlines(keepends=True)
  lines[1] = lines[1].replace(b'"a', b'"\xff')  # A byte no UTF-8 text holds, on line 2.
  path.write_bytes(b"".join(lines))
  with pytest.raises(ValueError, match=rf"{bad_file}:2: not valid UTF-8 \(invalid start byte: byte 0xff at column"):
    list(logs.LogsDataset(str(tmp_path)).examples("train"))


_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
  "bad_file,line,message",
  [
    # A lone surrogate escape decodes to a str no UTF-8 text (nor a tf.string) holds: it failed in tf.data.
    ("items.jsonl", r'{"ad_id": "x\ud800"}', r"items.jsonl:2: 'ad_id' holds a lone surrogate escape"),
    ("events.jsonl", r'{"user_id": "u\udc00", "timestamp": 1, "ad_id": "a1"}', r"events.jsonl:2: 'user_id' holds"),
    ("events.jsonl", r'{"timestamp": 1, "ad_id": "a1", "query_tokens": ["\uDBFF"]}', r"events.jsonl:2: 'query_tokens'"),
    ("events.jsonl", '{"ad_id": ["a1"], "timestamp": 1}', r"events.jsonl:2: 'ad_id' must be a string, got \['a1'\]"),
    (
      "events.jsonl",
      '{"user_id": ["u0"], "timestamp": 1, "ad_id": "a1"}',
      r"events.jsonl:2: 'user_id' must be a string",
    ),
    ("events.jsonl", '{"user_id": {"id": 1}, "timestamp": 1, "ad_id": "a1"}', r"events.jsonl:2: 'user_id' must be"),
    (
      "items.jsonl",
      '{"ad_id": "a2", "bid": 1' + "0" * 400 + "}",
      r"items.jsonl:2: 'bid' must be a non-negative number",
    ),
    (
      "events.jsonl",
      '{"timestamp": 1' + "0" * 400 + ', "ad_id": "a1"}',
      r"events.jsonl:2: 'timestamp' must be a finite",
    ),
    ("events.jsonl", '{"timestamp": 1' + "0" * 5000 + ', "ad_id": "a1"}', r"events.jsonl:2: not valid JSON: Exceeds"),
    ("events.jsonl", '{"timestamp": 1, "ad_id": "a1", "x": ' + _DEEP + "}", r"events.jsonl:2: not valid JSON: nested"),
    # json keeps a repeated key's last value: the line was silently about another ad.
    ("items.jsonl", '{"ad_id": "a2", "ad_id": "a3"}', r"items.jsonl:2: not valid JSON: the key 'ad_id' appears twice"),
    ("events.jsonl", '{"timestamp": 1, "ad_id": "a1", "ad_id"  :  "a0"}', r"events.jsonl:2: .* 'ad_id' appears twice"),
    ("events.jsonl", '{"timestamp": 1, "ad_id": "a1", "x": {"y": 1, "y": 2}}', r"events.jsonl:2: .* 'y' appears twice"),
    # Strings past logs.MAX_STRING_BYTES (UTF-8 bytes): every version would carry a long id per ad.
    ("items.jsonl", '{"ad_id": "' + "广" * 342 + '"}', r"items.jsonl:2: 'ad_id' holds a string of 1,026 bytes"),
    ("items.jsonl", '{"ad_id": "a2", "brand": "' + "b" * 1025 + '"}', r"items.jsonl:2: 'brand' holds a string of"),
    ("items.jsonl", '{"ad_id": "a2", "tokens": ["t", "' + "t" * 1025 + '"]}', r"items.jsonl:2: 'tokens' holds a"),
    (
      "events.jsonl",
      '{"user_id": "' + "u" * 1025 + '", "timestamp": 1, "ad_id": "a1"}',
      r"events.jsonl:2: 'user_id' h",
    ),
    (
      "events.jsonl",
      '{"timestamp": 1, "ad_id": "a1", "query_tokens": ["' + "q" * 1025 + '"]}',
      r"events.jsonl:2: 'query_",
    ),
    (
      "events.jsonl",
      '{"timestamp": 1, "ad_id": "' + "a" * 5000 + '"}',
      r"events.jsonl:2: ad_id 'aaaa.*\.\.\. is not in",
    ),
  ],
)
def test_lines_that_python_parses_but_training_cannot_use_are_reported_with_the_line(tmp_path, bad_file, line, message):
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "a1"}])
  write_jsonl(tmp_path / "events.jsonl", [{"user_id": "u1", "timestamp": 0, "ad_id": "a1"}])
  with open(tmp_path / bad_file, "a", encoding="utf-8") as f:
    f.write(line + "\n")
  with pytest.raises(ValueError, match=message) as error:
    logs.LogsDataset(str(tmp_path))  # Before any example is made: the up-front check catches it.
  # Short and one line, whatever the length of the temporary directory's path (it is longer under
  # pytest-xdist or another user name, which failed this check with a message of 205 characters).
  shown = str(error.value).replace(str(tmp_path), "<dir>")
  assert len(shown) < 200 and "\n" not in shown


def test_escaped_surrogate_pairs_and_integer_user_ids_are_text(tmp_path):
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "a1"}])
  (tmp_path / "events.jsonl").write_text(
    '{"user_id": "u\\ud83d\\ude00", "timestamp": 1, "ad_id": "a1"}\n{"user_id": 7, "timestamp": 2, "ad_id": "a1"}\n'
  )
  batch = next(logs.LogsDataset(str(tmp_path), test_fraction=0.0).examples("train"))
  assert list(batch[schema.USER_ID]) == ["u\U0001f600", "7"]


def test_utf8_ids_and_strings_of_the_longest_length_are_accepted(tmp_path):
  longest = "é" * (logs.MAX_STRING_BYTES // 2)  # 1,024 bytes in UTF-8.
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "广告-1", "category": longest}, {"ad_id": longest}])
  write_jsonl(tmp_path / "events.jsonl", [{"user_id": longest, "timestamp": t, "ad_id": "广告-1"} for t in range(3)])
  batch = next(logs.LogsDataset(str(tmp_path), test_fraction=0.0).examples("train"))
  assert list(batch[schema.AD_ID]) == ["广告-1"] * 3 and batch[schema.USER_ID][0] == longest


@pytest.mark.parametrize("as_directory", ["items.jsonl", "events.jsonl"])
def test_a_directory_in_place_of_a_log_file_is_a_clear_error(tmp_path, as_directory):
  write_jsonl(tmp_path / "items.jsonl", [{"ad_id": "a1"}])
  write_jsonl(tmp_path / "events.jsonl", [{"timestamp": 0, "ad_id": "a1"}])
  (tmp_path / as_directory).unlink()
  (tmp_path / as_directory).mkdir()
  with pytest.raises(ValueError, match=rf"{as_directory} is not a file"):
    logs.LogsDataset(str(tmp_path))


def _write_tiny_movielens(data_dir, ratings):
  """Two movies, two users and the given u.data lines, in ml-100k's formats."""
  genres = ["0"] * 19
  (data_dir / "u.item").write_text(
    "".join(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|{'|'.join(genres)}\n" for i in (1, 2)), encoding="latin-1"
  )
  (data_dir / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n", encoding="latin-1")
  (data_dir / "u.data").write_text("".join(line + "\n" for line in ratings))


_RATINGS = [f"{1 + t % 2}\t{1 + t % 2}\t3\t{881250949 + t}" for t in range(6)]


@pytest.mark.parametrize(
  "bad_line,message",
  [
    ("1\t99999\t3\t881250960", r"u.data:5: unknown movie id 99999 \(not in u.item\)"),
    ("7\t1\t3\t881250960", r"u.data:5: unknown user id 7 \(not in u.user\)"),
    ("1\tabc\t3\t881250960", r"u.data:5: the item id must be a whole number, got 'abc'"),
    ("1\t2\t3", r"u.data:5: expected 4 fields \(user id, item id, rating, timestamp\), got 3"),
    ("1\t2\t3.5\t881250960", r"u.data:5: the rating must be a whole number, got '3.5'"),
    # Past int64: numpy's error named row 4, not a line.
    ("1\t2\t3\t99999999999999999999", r"u.data:5: the timestamp 99999999999999999999 is out of range"),
  ],
)
def test_a_bad_movielens_rating_is_reported_with_the_file_and_line(tmp_path, bad_line, message):
  # A blank line before it: numpy numbers rows, not lines; the error must give the line.
  _write_tiny_movielens(tmp_path, _RATINGS[:3] + ["", bad_line] + _RATINGS[3:])
  with pytest.raises(ValueError, match=message) as error:
    movielens.MovieLens100K(str(tmp_path))
  assert str(error.value).startswith(str(tmp_path / "u.data"))


def test_bad_movielens_item_and_user_lines_are_reported_with_the_file_and_line(tmp_path):
  _write_tiny_movielens(tmp_path, _RATINGS)
  assert movielens.MovieLens100K(str(tmp_path)).num_items == 2
  with open(tmp_path / "u.user", "a") as f:
    f.write("3|old|M|other|1\n")
  with pytest.raises(ValueError, match=r"u.user:3: expected user id\|age\|gender\|occupation\|zip code"):
    movielens.MovieLens100K(str(tmp_path))
  with open(tmp_path / "u.item", "a") as f:
    f.write("3|Truncated line\n")
  with pytest.raises(ValueError, match=r"u.item:3: expected 24 '\|'-separated fields"):
    movielens.MovieLens100K(str(tmp_path))


@pytest.mark.parametrize(
  "name,line,message",
  [
    # A second profile of user 1 replaced the first in silence.
    ("u.user", "1|30|F|other|12345", r"u.user:3: user id '1' is already on line 1; user ids must be unique"),
    ("u.item", f"2|Again (1996)|01-Jan-1996||http://x|{'|'.join(['0'] * 19)}", r"u.item:3: movie id '2' is already on"),
  ],
)
def test_a_movielens_id_on_two_lines_is_reported_with_both(tmp_path, name, line, message):
  _write_tiny_movielens(tmp_path, _RATINGS)
  with open(tmp_path / name, "a", encoding="latin-1") as f:
    f.write(line + "\n")
  with pytest.raises(ValueError, match=message) as error:
    movielens.MovieLens100K(str(tmp_path))
  assert str(error.value).startswith(str(tmp_path / name))


def _same_movielens(expected: movielens.MovieLens100K, actual: movielens.MovieLens100K) -> bool:
  """Whether two readers give the same catalog, profiles and examples of the "time" split."""
  if actual.num_items != expected.num_items or actual.user_profiles() != expected.user_profiles():
    return False
  return all(
    set(a) == set(e) and all(np.array_equal(a[k], e[k]) for k in e)
    for split in ("train", "test")
    for e, a in zip(expected.examples(split), actual.examples(split), strict=True)
  )


def test_blank_movielens_lines_are_skipped_in_every_file(tmp_path):
  """u.data skipped them (np.loadtxt does), but u.item and u.user refused them, a last empty line too."""
  _write_tiny_movielens(tmp_path, _RATINGS)
  plain = movielens.MovieLens100K(str(tmp_path), split="time")
  for name in movielens.FILES:
    lines = (tmp_path / name).read_text(encoding="latin-1").splitlines(keepends=True)
    (tmp_path / name).write_text("".join(["\n", lines[0], " \t\r\n", *lines[1:], "\n"]), encoding="latin-1")
  assert _same_movielens(plain, movielens.MovieLens100K(str(tmp_path), split="time"))
  # Blank lines keep their numbers: after two profiles and three blank lines, a bad one is line 6.
  with open(tmp_path / "u.user", "a") as f:
    f.write("3|old|M|other|1\n")
  with pytest.raises(ValueError, match=r"u.user:6: expected user id\|age"):
    movielens.MovieLens100K(str(tmp_path))


@pytest.mark.parametrize("name", movielens.FILES)
def test_a_byte_order_mark_before_a_movielens_file_is_skipped(tmp_path, name):
  """Read as Latin-1, it was part of the first id: u.data then named movie or user 1 as unknown."""
  _write_tiny_movielens(tmp_path, _RATINGS)
  plain = movielens.MovieLens100K(str(tmp_path), split="time")
  path = tmp_path / name
  path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
  assert _same_movielens(plain, movielens.MovieLens100K(str(tmp_path), split="time"))


def test_movielens_files_at_a_url_are_read_as_local_ones(tmp_path):
  """--data_dir is any path tf.io.gfile opens (README, "Where data lives"); MovieLens there was "missing"."""
  _write_tiny_movielens(tmp_path, _RATINGS)
  url = f"ram://{tmp_path.name}/ml"  # TensorFlow's in-memory file system stands for gs:// and the like.
  tf.io.gfile.makedirs(url)
  for name in movielens.FILES:
    tf.io.gfile.copy(str(tmp_path / name), f"{url}/{name}")
  local, remote = movielens.MovieLens100K(str(tmp_path), split="time"), movielens.MovieLens100K(url, split="time")
  for split in ("train", "test"):
    for expected, actual in zip(local.examples(split), remote.examples(split), strict=True):
      assert set(actual) == set(expected) and all(np.array_equal(actual[k], expected[k]) for k in expected)
  tf.io.gfile.remove(f"{url}/u.user")
  with pytest.raises(FileNotFoundError, match=r"ml is not a MovieLens-100K directory: missing u.user"):
    movielens.MovieLens100K(url)


def test_events_appended_after_the_logs_are_opened_are_in_no_split(tmp_path):
  """The splits read the file to its end: events a writer appended after the count went to the test
  split of a run whose config.json recorded the file as counted, and a line still being written
  failed a training run at its last pass, the final evaluation, with every epoch done."""
  logs_testlib.write_tiny_logs(str(tmp_path))
  source = logs.LogsDataset(str(tmp_path))
  splits = {split: list(source.examples(split)) for split in ("train", "test")}
  with open(tmp_path / logs.EVENTS_FILE, "a") as f:
    f.write('{"user_id": "u1", "timestamp": 64, "ad_id": "a1"}\n{"user_id": "u1", "times')
  for split, expected in splits.items():
    for e, a in zip(expected, source.examples(split), strict=True):
      assert set(a) == set(e) and all(np.array_equal(a[k], e[k]) for k in e)


def test_a_byte_order_mark_before_the_logs_is_skipped(tmp_path):
  """Windows editors write one; json refused the first line ("Unexpected UTF-8 BOM")."""
  logs_testlib.write_tiny_logs(str(tmp_path))
  plain = logs.LogsDataset(str(tmp_path))
  for name in (logs.ITEMS_FILE, logs.EVENTS_FILE):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
  marked = logs.LogsDataset(str(tmp_path))
  assert marked.num_items == plain.num_items and marked.events_summary == plain.events_summary
  # Only before the first line: elsewhere it is a character, and no ad id starts with one.
  with open(tmp_path / logs.EVENTS_FILE, "ab") as f:
    f.write(b'\xef\xbb\xbf{"timestamp": 99, "ad_id": "a1"}\n')
  with pytest.raises(ValueError, match=r"events.jsonl:\d+: not valid JSON"):
    logs.LogsDataset(str(tmp_path))
