"""MovieLens-100K as retrieval data, split by the TFRS tutorials' protocol.

Ratings are implicit positives. They are shuffled with seed 42 and split 80k train / 20k test, as in
the TFRS retrieval tutorials. Items map onto the ad schema: the movie id is the ad id, its first genre
the category, its decade the brand, and its genres plus title words the tokens. A user's behaviour
sequence is their training ratings before the one being predicted, in time order; the most recent
of them plays the query. Test ratings never enter any behaviour sequence, so no test label is ever
an input.

The "leave_last_out" split instead holds out each user's last rating in time (ties in file order):
943 test examples, one per user, whose behaviour sequence is everything the user rated before.

The "time" split holds out the last 10% of ratings in time, as production does: the model is trained
on the past and judged on what came after. A test rating's behaviour sequence is every rating its
user made before it, test ratings included (they were logged by then), and never a later one;
ratings of the same second count in file order (52% of test ratings have one among their 20 latest).

Blank lines are skipped in all three files, as is a UTF-8 byte order mark at the start of one; a
malformed line is an error naming the file and line.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import itertools
import os
import re
from collections.abc import Iterator

import numpy as np

from models.data import cold_start, logs, schema, sequences

_GENRES = (
  "unknown",
  "Action",
  "Adventure",
  "Animation",
  "Children's",
  "Comedy",
  "Crime",
  "Documentary",
  "Drama",
  "Fantasy",
  "Film-Noir",
  "Horror",
  "Musical",
  "Mystery",
  "Romance",
  "Sci-Fi",
  "Thriller",
  "War",
  "Western",
)
NUM_TRAIN = 80_000
SPLIT_SEED = 42
TIME_TEST_FRACTION = 0.1
SPLITS = ("default", "leave_last_out", "time")
FILES = ("u.data", "u.item", "u.user")  # The files of ml-100k this reader uses.


_RATING_FIELDS = ("user id", "item id", "rating", "timestamp")
_INT64 = np.iinfo(np.int64)
# A UTF-8 byte order mark as the Latin-1 reader sees it ("ï»¿").
_BYTE_ORDER_MARK = codecs.BOM_UTF8.decode("latin-1")


def read_ratings(data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """u.data's ratings [n, 4] (user, item, rating, timestamp) in file order, and their time order.

  Ratings with the same timestamp keep their file order. A malformed line is a ValueError naming it.
  """
  path = os.path.join(data_dir, "u.data")
  try:
    with _text_lines(path) as lines:
      raw = np.loadtxt(lines, dtype=np.int64, ndmin=2)
  except ValueError as e:  # numpy's message names a row, not the file (nor a line, if it skipped any).
    raise _first_bad_rating(path, e) from None
  if raw.shape[1] != len(_RATING_FIELDS):
    raise _first_bad_rating(path, None)
  return raw, np.lexsort((np.arange(len(raw)), raw[:, 3]))


@contextlib.contextmanager
def _text_lines(path: str) -> Iterator[Iterator[str]]:
  """The lines of a MovieLens file (Latin-1, any line ends), on local disk or at a URL tf.io.gfile opens.

  A UTF-8 byte order mark before the first line is skipped, as the log reader skips one: an editor
  that saved the file as UTF-8 wrote it, and it carries no data. Read as Latin-1 it was part of the
  first id, which u.data then named as unknown. Every field read is ASCII (ids, numbers, genre flags,
  title words), so a UTF-8 file otherwise gives the same features as the Latin-1 original.
  """
  with io.TextIOWrapper(logs.open_binary(path), encoding="latin-1") as f:
    first = f.readline()
    yield itertools.chain([first.removeprefix(_BYTE_ORDER_MARK)] if first else [], f)


def _rating_lines(path: str) -> Iterator[tuple[int, list[str]]]:
  """(line number from 1, fields) of each line of u.data that holds a rating, as np.loadtxt reads them."""
  with _text_lines(path) as lines:
    for line_number, line in enumerate(lines, 1):
      fields = line.partition("#")[0].split()
      if fields:
        yield line_number, fields


def _first_bad_rating(path: str, error: ValueError | None) -> ValueError:
  """`u.data:<line>: ...` for the first line that is not four whole numbers."""
  for line_number, fields in _rating_lines(path):
    if len(fields) != len(_RATING_FIELDS):
      return ValueError(
        f"{path}:{line_number}: expected {len(_RATING_FIELDS)} fields ({', '.join(_RATING_FIELDS)}), got {len(fields)}"
      )
    for name, field in zip(_RATING_FIELDS, fields):
      try:
        value = int(field)
      except ValueError:
        return ValueError(f"{path}:{line_number}: the {name} must be a whole number, got {field!r}")
      if not _INT64.min <= value <= _INT64.max:  # np.loadtxt refused it naming a row, not a line.
        return ValueError(f"{path}:{line_number}: the {name} {field} is out of range (a 64-bit integer)")
  return ValueError(f"{path}: not a MovieLens ratings file" + (f" ({error})" if error else " (no ratings)"))


def _line_of_rating(path: str, row: int) -> int:
  """The line number of the row-th rating of u.data (from 0), as `read_ratings` numbered them."""
  for index, (line_number, _) in enumerate(_rating_lines(path)):
    if index == row:
      return line_number
  raise IndexError(row)


def _check_unique(path: str, line_number: int, what: str, key: str, line_of: dict[str, int]) -> None:
  """Raises `path:line: ...` naming both lines when `key` was on an earlier line (recorded in `line_of`)."""
  first = line_of.setdefault(key, line_number)
  if first != line_number:
    raise ValueError(f"{path}:{line_number}: {what} id {key!r} is already on line {first}; {what} ids must be unique")


def _age_bucket(age: int) -> str:
  for limit, label in ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55")):
    if age < limit:
      return label
  return "56+"


class MovieLens100K:
  """MovieLens-100K read from its original files (u.data, u.item, u.user).

  Args:
    data_dir: directory holding the unpacked ml-100k files.
    split: "default" (the TFRS protocol), "leave_last_out" or "time".
    held_out_fraction: share of movies kept out of training entirely (`cold_start.choose_held_out`
      with `held_out_seed`): their ratings are not training examples and never enter a behaviour
      sequence, nor so a query.
    held_out_seed: seed of that choice.
  """

  def __init__(self, data_dir: str, split: str = "default", held_out_fraction: float = 0.0, held_out_seed: int = 0):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    missing = [f for f in FILES if not logs.exists_as_file(os.path.join(data_dir, f))[0]]
    if missing:
      raise FileNotFoundError(f"{data_dir} is not a MovieLens-100K directory: missing {', '.join(missing)}")
    self.data_dir = data_dir
    self.split = split
    self._table = self._read_items()
    self.num_items = self._table.num_items
    self._user_features = self._read_users()
    held_out_rows = (
      cold_start.choose_held_out(self.num_items, held_out_fraction, held_out_seed)
      if held_out_fraction > 0
      else np.zeros(self.num_items, dtype=bool)
    )
    self._split = self._build_examples(held_out_rows)

  def features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return self._table.features(rows)

  def row_of(self, ad_id: str) -> int:
    return self._table.row_of[ad_id]

  def user_profiles(self) -> dict[str, list[str]]:
    """Each user's profile tokens (age bucket, gender, occupation, zip region), by user id."""
    return dict(self._user_features)

  def _read_items(self) -> sequences.InMemoryItemTable:
    ids, categories, brands, tokens = [], [], [], []
    line_of: dict[str, int] = {}
    path = os.path.join(self.data_dir, "u.item")
    with _text_lines(path) as lines:
      for line_number, line in enumerate(lines, 1):
        if not line.strip():
          continue  # Blank, as np.loadtxt skips them in u.data (a blank line at the end was refused).
        fields = line.rstrip("\n").split("|")
        if len(fields) != 5 + len(_GENRES):
          raise ValueError(
            f"{path}:{line_number}: expected {5 + len(_GENRES)} '|'-separated fields (id, title, dates, url, "
            f"{len(_GENRES)} genre flags), got {len(fields)}"
          )
        _check_unique(path, line_number, "movie", fields[0], line_of)
        genres = [g for g, flag in zip(_GENRES, fields[5:]) if flag == "1"] or ["unknown"]
        year = re.search(r"(\d{4})", fields[2] or fields[1])
        title = re.sub(r"\(\d{4}\)\s*$", "", fields[1]).lower()
        words = [w for w in re.findall(r"[a-z0-9']+", title) if len(w) > 1]
        ids.append(fields[0])
        categories.append(genres[-1] if len(genres) > 1 and genres[0] == "unknown" else genres[0])
        brands.append(f"decade:{year.group(1)[:3]}0" if year else "decade:unknown")
        tokens.append([f"genre:{g}" for g in genres] + words)
    return sequences.InMemoryItemTable(ids, categories, brands, tokens)

  def _read_users(self) -> dict[str, list[str]]:
    users = {}
    line_of: dict[str, int] = {}
    path = os.path.join(self.data_dir, "u.user")
    with _text_lines(path) as lines:
      for line_number, line in enumerate(lines, 1):
        if not line.strip():
          continue  # Blank, as in u.data and u.item.
        fields = line.rstrip("\n").split("|")
        if len(fields) != 5 or not fields[1].strip().isdigit():
          raise ValueError(f"{path}:{line_number}: expected user id|age|gender|occupation|zip code, age a whole number")
        # A second line of a user replaced the first one's profile in silence.
        _check_unique(path, line_number, "user", fields[0], line_of)
        user_id, age, gender, occupation, zip_code = fields
        users[user_id] = [
          f"age:{_age_bucket(int(age))}",
          f"gender:{gender}",
          f"occupation:{occupation}",
          f"zip:{zip_code[:1]}",
        ]
    return users

  def _build_examples(self, held_out_rows: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    raw, order = read_ratings(self.data_dir)
    users, items = raw[:, 0], raw[:, 1]
    if self.split == "time":
      is_train = np.zeros(len(raw), dtype=bool)
      is_train[order[: int(round(len(raw) * (1.0 - TIME_TEST_FRACTION)))]] = True
    elif self.split == "leave_last_out":
      is_train = np.ones(len(raw), dtype=bool)
      last_of_user = {user: i for i, user in zip(order.tolist(), users[order].tolist())}
      is_train[list(last_of_user.values())] = False
    else:
      is_train = np.zeros(len(raw), dtype=bool)
      is_train[np.random.default_rng(SPLIT_SEED).permutation(len(raw))[:NUM_TRAIN]] = True

    self._check_ids(users, items)
    rows = np.asarray([self._table.row_of[str(i)] for i in items[order].tolist()])
    held_out = held_out_rows[rows]
    # Under the time split, earlier test ratings are history too: they were logged by then.
    enters_history = np.ones(len(raw), dtype=bool) if self.split == "time" else is_train
    hist_rows = sequences.HistoryTracker().observe(users[order], rows, enters_history=enters_history[order] & ~held_out)

    latest = hist_rows[:, 0]
    latest_items = self._table.features(np.maximum(latest, 0))
    queries = [
      [f"item:{ad_id}", *(t for t in tokens if t)] if row >= 0 else []
      for row, ad_id, tokens in zip(latest.tolist(), latest_items[schema.AD_ID], latest_items[schema.AD_TOKENS])
    ]
    user_ids = [str(u) for u in users[order].tolist()]
    examples = sequences.make_examples(
      self._table,
      user_ids=np.asarray(user_ids, dtype=object),
      user_features=schema.pad_tokens([self._user_features[u] for u in user_ids], schema.USER_FEATURES_LEN),
      query_tokens=schema.pad_tokens(queries, schema.QUERY_TOKENS_LEN),
      hist_rows=hist_rows,
      item_rows=rows,
    )
    train, test = is_train[order] & ~held_out, ~is_train[order]
    return {"train": {k: v[train] for k, v in examples.items()}, "test": {k: v[test] for k, v in examples.items()}}

  def _check_ids(self, users: np.ndarray, items: np.ndarray) -> None:
    """Raises `u.data:<line>: ...` for the first rating of a movie not in u.item or a user not in u.user."""
    for ids, known, field, other_file in (
      (items, self._table.row_of, "movie id", "u.item"),
      (users, self._user_features, "user id", "u.user"),
    ):
      unknown = [i for i in np.unique(ids).tolist() if str(i) not in known]
      if unknown:
        row = int(np.flatnonzero(np.isin(ids, unknown))[0])
        path = os.path.join(self.data_dir, "u.data")
        raise ValueError(f"{path}:{_line_of_rating(path, row)}: unknown {field} {ids[row]} (not in {other_file})")

  def examples(self, split: str, chunk_size: int = 8192) -> Iterator[dict[str, np.ndarray]]:
    """Yields batches of the "train" (80k) or "test" (20k) split, in time order.

    Under "leave_last_out" the test split is each user's last rating and "train" is the rest; under
    "time" it is the last 10% of ratings in time.
    """
    if split not in self._split:
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = self._split[split]
    total = len(data[schema.AD_ID])
    for start in range(0, total, chunk_size):
      yield {k: v[start : start + chunk_size] for k, v in data.items()}
