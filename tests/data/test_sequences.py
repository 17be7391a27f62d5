"""HistoryTracker: batched array updates give the same sequences as replaying events one by one."""

import collections

import numpy as np
import pytest

from models.data import sequences


def _replay(events, history_len):
  """The definition: each event sees its user's latest entering events, most recent first."""
  recent = collections.defaultdict(lambda: collections.deque(maxlen=history_len))
  out = []
  for user, row, enters in events:
    seen = list(reversed(recent[user]))
    out.append(seen + [-1] * (history_len - len(seen)))
    if enters:
      recent[user].append(row)
  return np.asarray(out, dtype=np.int64).reshape(-1, history_len)


@pytest.mark.parametrize("history_len", [1, 3, 20])
@pytest.mark.parametrize("string_keys", [False, True])
def test_batches_match_event_by_event_replay(history_len, string_keys):
  rng = np.random.default_rng(history_len)
  tracker = sequences.HistoryTracker(history_len)
  events = []
  got = []
  for size in [0, 1, 700, 50, 3000]:  # Users recur within and across batches; one batch is empty.
    users = rng.integers(0, 120, size)
    keys = np.asarray([f"user-{u}" for u in users], dtype=object) if string_keys else users
    rows = rng.integers(0, 5000, size)
    enters = rng.random(size) < 0.8
    got.append(tracker.observe(keys, rows, enters))
    events += list(zip(keys.tolist(), rows.tolist(), enters.tolist()))
  np.testing.assert_array_equal(np.concatenate(got), _replay(events, history_len))
  assert tracker.num_users == len({user for user, _, _ in events})


def test_state_is_a_compact_table_not_an_object_per_user():
  tracker = sequences.HistoryTracker(20)
  tracker.observe(np.arange(50_000), np.zeros(50_000, dtype=np.int64))
  assert tracker.table_bytes <= 2 * 50_000 * 20 * 4  # int32 rows, grown by doubling


def test_rows_out_of_range_are_rejected():
  with pytest.raises(ValueError, match="item rows"):
    sequences.HistoryTracker().observe(np.array([1]), np.array([-1]))


def test_a_duplicated_ad_id_is_named_with_its_rows():
  with pytest.raises(ValueError, match=r"must be unique: 'b' is on rows 1 and 3"):
    sequences.InMemoryItemTable(["a", "b", "c", "b"], ["x"] * 4, ["y"] * 4, [[]] * 4)
