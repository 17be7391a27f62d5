"""A user's own logs in the generic format (see docs/data_format.md): a catalog and an event stream.

`items.jsonl`, one ad per line (`bid` optional):
  {"ad_id": "a1", "category": "shoes", "brand": "acme", "tokens": ["running", "shoes"], "status": "active",
   "bid": 0.8}
`events.jsonl`, one positive interaction (click or conversion) per line, sorted by timestamp:
  {"user_id": "u1", "timestamp": 1700000000, "user_features": ["age:25-34"], "query_tokens": ["running"],
   "ad_id": "a1", "event": "click"}

The last `test_fraction` of events (in time) is held out. Behaviour sequences are built from the
events themselves, so they need not be logged; an event without a `user_id` has an empty one and
enters nobody's. Example batches carry "converted" (the event is a conversion) when the log has any
conversion event, and "bid" (the ad's bid) when the catalog has bids.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from models.data import schema, sequences

ITEMS_FILE = "items.jsonl"
EVENTS_FILE = "events.jsonl"
_EVENT_KINDS = ("click", "conversion")
STATUSES = ("active", "paused")
# The longest string a line may hold in any field (an id, category, brand, token, feature), in UTF-8
# bytes. Ids are keys: a UUID is 36 bytes and a SHA-256 hex digest 64, so 1 KiB takes any usual
# scheme, while bounding what every version carries per ad (docs/data_format.md, "Limits").
MAX_STRING_BYTES = 1024


# The longest line a JSON Lines file (items.jsonl, events.jsonl, a catalog delta) may hold, in bytes
# without its "\n". The richest line the towers read is about 14 KiB: 8 query tokens, 4 user features,
# 8 ad tokens and the ids, each at most MAX_STRING_BYTES; written as \uXXXX escapes, about 84 KiB.
# 1 MiB leaves room for a dozen times that and for fields the reader ignores (a log's own extras),
# while bounding what one line costs to read: a 200 MB line was read and parsed whole (1.1 GB peak).
MAX_LINE_BYTES = 1 << 20


def is_remote(path: str) -> bool:
  """Whether `path` is a URL (gs://, s3://, ...), read through tf.io.gfile, rather than a local path."""
  return "://" in path


class _GFileReader(io.RawIOBase):
  """A tf.io.gfile file as a raw binary stream, so io.BufferedReader gives it readline(limit): GFile's
  own readline reads a line whole, whatever its length."""

  def __init__(self, path: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for remote logs)

    super().__init__()
    self._file = tf.io.gfile.GFile(path, "rb")

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    data = self._file.read(len(buffer))
    buffer[: len(data)] = data
    return len(data)

  def close(self) -> None:
    self._file.close()
    super().close()


def open_binary(path: str) -> io.BufferedIOBase:
  """A local file, or a URL `tf.io.gfile` opens (the README's "Where data lives"), for reading bytes."""
  return io.BufferedReader(_GFileReader(path), 1 << 20) if is_remote(path) else open(path, "rb")


def text_lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number from 1, line) of a UTF-8 text file, split at each line feed as JSON Lines are.

  Raises a ValueError naming the line for bytes that are not UTF-8, or for a line longer than
  MAX_LINE_BYTES, which is refused after reading one byte more than the limit, not the whole line.
  """
  with open_binary(path) as f:
    for line_number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
      if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
        raise ValueError(
          f"{path}:{line_number}: line longer than {MAX_LINE_BYTES:,} bytes, the most a line may hold "
          "(see docs/data_format.md)"
        )
      try:
        # A byte order mark before the first line (Windows editors write one) is skipped.
        line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
          f"{path}:{line_number}: not valid UTF-8 ({e.reason}: byte {e.object[e.start]:#04x} at column {e.start + 1})"
        ) from None
      yield line_number, line


def exists_as_file(path: str) -> tuple[bool, bool]:
  """(whether `path` exists, whether it is a file rather than a directory), local or at a URL."""
  if not is_remote(path):
    return os.path.exists(path), os.path.isfile(path)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for remote data)

  from models.data import tfrecord  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

  tfrecord.load_file_system(path)  # s3://, hdfs://, az:// need tensorflow-io.
  return tf.io.gfile.exists(path), not tf.io.gfile.isdir(path)


def check_file(path: str) -> None:
  """Raises a clear error unless `path` is an existing regular file (not a directory), local or a URL."""
  exists, is_file = exists_as_file(path)
  if not exists:
    raise FileNotFoundError(f"{path} is missing; see docs/data_format.md")
  if not is_file:
    raise ValueError(f"{path} is not a file (a directory?); it must be a JSON Lines file, see docs/data_format.md")


# A \uD800-\uDFFF escape: the only way a line that decoded as UTF-8 can give a string holding a lone
# surrogate, which no UTF-8 text (nor a tf.string) can hold. Pairs of them are fine (an emoji).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  for line_number, line in text_lines(path):
    if line.strip():
      yield line_number, parse_json_object(line, f"{path}:{line_number}")


def parse_json_object(line: str, where: str) -> dict[str, Any]:
  """One JSON Lines line as an object whose strings are all UTF-8 text and whose keys are each named
  once; errors start with `where`.

  (Catalog deltas are read with it too, under the same rules.) json keeps a repeated key's last value:
  `{"ad_id": "a", "ad_id": "b", ...}` would silently be about b. Only a line with more colons than its
  object has keys can repeat one (or nest objects, or hold a colon in a string); only those lines are
  parsed a second time with a check of every object's keys, so the big logs keep json's C parser alone.
  """
  try:
    record = json.loads(line)
    if isinstance(record, dict) and line.count(":") > len(record):
      json.loads(line, object_pairs_hook=_unique_keys)
  except RecursionError:
    raise ValueError(f"{where}: not valid JSON: nested too deeply") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON: {e}") from None
  except ValueError as e:  # An integer of more digits than Python converts; the rest of the text is a hint.
    raise ValueError(f"{where}: not valid JSON: {str(e).split(':')[0]}") from None
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object")
  if _SURROGATE_ESCAPE.search(line):
    field = _field_not_utf8(record)
    if field is not None:
      raise ValueError(f"{where}: {field!r} holds a lone surrogate escape (\\ud800-\\udfff): not UTF-8 text")
  return record


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  record = dict(pairs)
  if len(record) != len(pairs):
    seen: set[str] = set()
    repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
    raise ValueError(f"the key {repeated!r} appears twice in one object")
  return record


def _field_not_utf8(record: dict[str, Any]) -> str | None:
  """The top-level field of `record` holding a string (or key) that is not UTF-8 text, if any.

  Walks with an explicit stack: json.loads took the record nearly as deep as Python recurses.
  """
  for field, value in record.items():
    stack = [field, value]
    while stack:
      item = stack.pop()
      if isinstance(item, str):
        try:
          item.encode("utf-8")
        except UnicodeEncodeError:
          return field
      elif isinstance(item, dict):
        stack.extend(item.keys())
        stack.extend(item.values())
      elif isinstance(item, list):
        stack.extend(item)
  return None


def _finite(value: Any) -> bool:
  """Whether a JSON number is finite as a float; an integer too large for a float is not."""
  try:
    return math.isfinite(value)
  except OverflowError:
    return False


def _shown(value: Any) -> str:
  """`value!r` for an error message, cut short (an integer of 400 digits is not worth printing)."""
  text = repr(value)
  return text if len(text) <= 40 else f"{text[:37]}..."


def check_length(value: str, field: str) -> None:
  """Raises ValueError if `value` is longer than MAX_STRING_BYTES in UTF-8; the message names `field`."""
  if len(value) > MAX_STRING_BYTES // 4 and len(value.encode("utf-8", "surrogatepass")) > MAX_STRING_BYTES:
    raise ValueError(
      f"{field!r} holds a string of {len(value.encode('utf-8', 'surrogatepass')):,} bytes, more than the "
      f"{MAX_STRING_BYTES:,} a field may hold (UTF-8; see docs/data_format.md)"
    )


def _string_list(path: str, line_number: int, record: dict[str, Any], key: str) -> list[str]:
  value = record.get(key, [])
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise ValueError(f"{path}:{line_number}: {key!r} must be a list of strings")
  for item in value:
    _check_length_at(path, line_number, item, key)
  return value


def _check_length_at(path: str, line_number: int, value: str, field: str) -> None:
  try:
    check_length(value, field)
  except ValueError as e:
    raise ValueError(f"{path}:{line_number}: {e}") from None


def _user_id(path: str, line_number: int, record: dict[str, Any]) -> str:
  """The event's user id as a string (an integer id as its digits); "" (anonymous) when the line has none or null."""
  value = record.get("user_id")
  if value is None:
    return ""
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise ValueError(f"{path}:{line_number}: 'user_id' must be a string, got {_shown(value)}")
  _check_length_at(path, line_number, str(value), "user_id")
  return str(value)


# The largest bid: bids are float32 from here on (example batches, prepared shards, the value objective),
# and a larger one, finite to JSON, became inf there: the value objective's loss went NaN (inf / inf).
MAX_BID = float(np.finfo(np.float32).max)


def _bid(path: str, line_number: int, record: dict[str, Any]) -> float | None:
  """The item's optional bid: a non-negative number of at most MAX_BID, or None when the line has none."""
  value = record.get("bid")
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or not 0 <= value <= MAX_BID:
    raise ValueError(
      f"{path}:{line_number}: 'bid' must be a non-negative number of at most {MAX_BID:.4g} (a float32), "
      f"got {_shown(value)}"
    )
  return float(value)


def item_fields(record: dict[str, Any]) -> tuple[str, str, list[str], str]:
  """(category, brand, tokens, status) of an items.jsonl line or catalog delta line, "" and [] when absent.

  The one set of type rules for an ad's fields, so a catalog and a delta accept the same lines.
  Raises ValueError naming the field; callers prefix the file and line.
  """
  status = record.get("status", "active")
  if status not in STATUSES:
    raise ValueError(f"'status' must be one of {STATUSES}, got {status!r}")
  tokens = record.get("tokens", [])
  if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
    raise ValueError("'tokens' must be a list of strings")
  for token in tokens:
    check_length(token, "tokens")
  for key in ("category", "brand"):
    if not isinstance(record.get(key, ""), str):
      raise ValueError(f"{key!r} must be a string, got {_shown(record[key])}")
    check_length(record.get(key, ""), key)
  return record.get("category", ""), record.get("brand", ""), tokens, status


def read_catalog(path: str) -> tuple[sequences.InMemoryItemTable, np.ndarray | None]:
  """Reads items.jsonl into an item table and its bids.

  `ad_id` is required, other fields default to "". The bids are float32 [N], 0 for an item without
  one, or None when no item has a bid (the catalog has no money in it).
  """
  ids, categories, brands, tokens, statuses, bids = [], [], [], [], [], []
  line_of: dict[str, int] = {}
  for line_number, record in _read_jsonl(path):
    if not isinstance(record.get("ad_id"), str) or not record["ad_id"]:
      raise ValueError(f"{path}:{line_number}: 'ad_id' must be a non-empty string")
    _check_length_at(path, line_number, record["ad_id"], "ad_id")
    first = line_of.setdefault(record["ad_id"], line_number)
    if first != line_number:
      raise ValueError(
        f"{path}:{line_number}: ad_id {record['ad_id']!r} is already on line {first}; ad ids must be unique"
      )
    try:
      category, brand, ad_tokens, status = item_fields(record)
    except ValueError as e:
      raise ValueError(f"{path}:{line_number}: {e}") from None
    ids.append(record["ad_id"])
    categories.append(category)
    brands.append(brand)
    tokens.append(ad_tokens)
    statuses.append(status)
    bids.append(_bid(path, line_number, record))
  if not ids:
    raise ValueError(f"{path}: the catalog is empty")
  table = sequences.InMemoryItemTable(ids, categories, brands, tokens, statuses)
  if all(bid is None for bid in bids):
    return table, None
  return table, np.asarray([0.0 if bid is None else bid for bid in bids], dtype=np.float32)


class LogsDataset:
  """Training examples from a directory holding items.jsonl and events.jsonl.

  Args:
    data_dir: the directory.
    test_fraction: the last share of events (in time) held out for evaluation.

  Attributes:
    has_conversions: events.jsonl has a conversion event, so example batches carry "converted".
    events_summary: where the events are and how many precede the test split, for error messages.
  """

  def __init__(self, data_dir: str, test_fraction: float = 0.1):
    self._items_path = os.path.join(data_dir, ITEMS_FILE)
    self._events_path = os.path.join(data_dir, EVENTS_FILE)
    for path in (self._items_path, self._events_path):
      check_file(path)
    self._table, self._bids = read_catalog(self._items_path)
    self.num_items = self._table.num_items
    # Every event is checked here, once, before any training: a bad line then fails the tool at once
    # with its file and line, rather than minutes in, from inside tf.data's reading thread.
    num_events, self.has_conversions = 0, False
    for *_, converted in self._events():
      num_events += 1
      self.has_conversions = self.has_conversions or converted
    self._num_events = num_events
    self._num_train = int(round(num_events * (1.0 - test_fraction)))
    self.events_summary = (
      f"{self._events_path} holds {num_events} events, {self._num_train} of them before the test split"
    )

  def features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return self._table.features(rows)

  def row_of(self, ad_id: str) -> int:
    return self._table.row_of[ad_id]

  def bids(self, rows: np.ndarray) -> np.ndarray | None:
    """float32 [n] bids of catalog rows (0 for items logged without one); None if no item has a bid."""
    return None if self._bids is None else self._bids[rows]

  def examples(self, split: str, chunk_size: int = 8192) -> Iterator[dict[str, np.ndarray]]:
    """Streams batches of the "train" or "test" split; events must be sorted by timestamp.

    Besides the features every source yields (`sequences.make_examples`), a batch holds "converted"
    (bool [n], the event is a conversion) when the log has any conversion event, and "bid"
    (float32 [n], the ad's bid) when the catalog has bids.

    Only the events counted when the logs were opened are read (the training split stops at the
    test split): events a writer appends later are in neither split, and a line it is still writing
    is never parsed.
    """
    if split not in ("train", "test"):
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    tracker = sequences.HistoryTracker()
    chunk: list[tuple[int, str, list[str], list[str], int, bool]] = []
    for event in itertools.islice(self._events(), self._num_train if split == "train" else self._num_events):
      chunk.append(event)
      if len(chunk) == chunk_size:
        yield from self._emit(chunk, tracker, split)
        chunk = []
    if chunk:
      yield from self._emit(chunk, tracker, split)

  def _events(self) -> Iterator[tuple[int, str, list[str], list[str], int, bool]]:
    """(index, user id, user features, query tokens, catalog row, converted) of each event, checked."""
    last_timestamp = None
    for index, (line_number, record) in enumerate(_read_jsonl(self._events_path)):
      timestamp = record.get("timestamp")
      # bool is an int to Python, and NaN compares false with everything (it would pass any order check).
      if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not _finite(timestamp):
        raise ValueError(
          f"{self._events_path}:{line_number}: 'timestamp' must be a finite number, got {_shown(timestamp)}"
        )
      if last_timestamp is not None and timestamp < last_timestamp:
        raise ValueError(f"{self._events_path}:{line_number}: events must be sorted by timestamp")
      last_timestamp = timestamp
      event = record.get("event", "click")
      if event not in _EVENT_KINDS:
        raise ValueError(f"{self._events_path}:{line_number}: 'event' must be one of {_EVENT_KINDS}")
      ad_id = record.get("ad_id")
      if not isinstance(ad_id, str):
        raise ValueError(f"{self._events_path}:{line_number}: 'ad_id' must be a string, got {_shown(ad_id)}")
      if ad_id not in self._table.row_of:
        raise ValueError(f"{self._events_path}:{line_number}: ad_id {_shown(ad_id)} is not in {ITEMS_FILE}")
      yield (
        index,
        _user_id(self._events_path, line_number, record),
        _string_list(self._events_path, line_number, record, "user_features"),
        _string_list(self._events_path, line_number, record, "query_tokens"),
        self._table.row_of[ad_id],
        event == "conversion",
      )

  def _emit(self, chunk, tracker: sequences.HistoryTracker, split: str) -> Iterator[dict[str, np.ndarray]]:
    index, users, user_features, query_tokens, rows, converted = (list(column) for column in zip(*chunk))
    users_array, rows_array = np.asarray(users, dtype=object), np.asarray(rows, dtype=np.int64)
    # An event without a user id has no history and enters none: anonymous users share nothing.
    known = users_array != ""
    hist_rows = np.full([len(users), tracker.history_len], -1, dtype=np.int64)
    hist_rows[known] = tracker.observe(users_array[known], rows_array[known])
    in_train = np.asarray(index) < self._num_train
    keep = in_train if split == "train" else ~in_train
    if keep.any():
      batch = sequences.make_examples(
        self._table,
        user_ids=users_array[keep],
        user_features=schema.pad_tokens(user_features, schema.USER_FEATURES_LEN)[keep],
        query_tokens=schema.pad_tokens(query_tokens, schema.QUERY_TOKENS_LEN)[keep],
        hist_rows=hist_rows[keep],
        item_rows=rows_array[keep],
      )
      if self.has_conversions:
        batch[schema.CONVERTED] = np.asarray(converted, dtype=bool)[keep]
      if self._bids is not None:
        batch[schema.BID] = self._bids[rows_array[keep]]
      yield batch
