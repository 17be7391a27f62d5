"""fgr-refresh: deltas, rebuilt and status-only versions, rollback, retention and the watch loop."""

import json
import logging
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from engine import full_graph
from export import (
  refresh,
  refresh_apply,
  refresh_delta,
  refresh_state,
  refresh_watch,
  version_files,
  version_report,
  versions,
)
from models import config as config_lib
from models.data import logs, schema, sources
from models.data import queries as queries_lib
from tests import topk_testlib
from tests.conftest import SCANN_EXPORT_K
from tests.export import checkpoint_testlib, delta_testlib

K = SCANN_EXPORT_K
# For watch tests whose files are complete when polled: nothing to wait for.
WRITTEN = refresh_watch.Settle(0)


@pytest.fixture(scope="module")
def exported(trained_run, scann_export):
  """Version 1 of the tiny run (the shared ScaNN export, exact at this size) and a few held-out queries."""
  import scann  # noqa: F401  Registers ScaNN's ops for loading versions in this process.

  source = sources.open_source(sources.DataSpec.from_json(config_lib.read_run_config(trained_run)["data"]))
  return scann_export, source, queries_lib.held_out_queries(source, 8)


@pytest.fixture(scope="module")
def served_v1(exported):
  """Version 1 loaded, and its served ids [Q, K] for the held-out queries (read-only): loaded once."""
  version_path, _, queries = exported
  loaded, ids = _serve(version_path, queries)
  ids.setflags(write=False)
  return loaded, ids


@pytest.fixture
def base_path(exported, tmp_path):
  """A fresh model base path holding (hard links to) version 1."""
  path = str(tmp_path / "models")
  version_files.link_tree(exported[0], os.path.join(path, "1"))
  return path


def _serve(version_path, queries):
  loaded = tf.saved_model.load(version_path)
  tensors = {name: tf.constant(values) for name, values in queries.items()}
  return loaded, loaded.signatures["serving_default"](**tensors)["ids"].numpy().astype(str)


def test_delta_lines_later_lines_win_and_errors_name_the_line():
  delta = refresh_delta.parse_lines(
    [
      '{"ad_id": "a1", "category": "c", "tokens": ["x"]}',
      '{"ad_id": "a1", "status": "paused"}',
      '{"ad_id": "a2", "status": "paused"}',
      '{"ad_id": "a2", "status": "active"}',
      "",
      '{"ad_id": "a3", "deleted": true}',
    ]
  )
  assert delta.upserts["a1"].status == "paused" and delta.upserts["a1"].tokens == ("x",)
  assert delta.statuses == {"a2": "active"} and delta.removals == {"a3"}
  for line, message in [
    ('{"ad_id": "a"', "not valid JSON|Expecting"),
    ('{"ad_id": ""}', "ad_id"),
    ('{"ad_id": "a", "status": "gone"}', "status"),
    ('{"ad_id": "a", "deleted": false}', "removal"),
    ('{"ad_id": "a", "price": 3}', "unknown fields"),
    ('{"ad_id": "a"}', "features"),
    ('{"ad_id": "a", "tokens": "x y"}', "tokens"),
    # As items.jsonl refuses them (they failed later, or as a traceback).
    ('{"ad_id": "\\ud800", "status": "paused"}', "lone surrogate"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"ad_id": "a", "bid": ' + "9" * 5000 + "}", "not valid JSON"),
    # json keeps a repeated key's last value: this line paused ad b, silently.
    ('{"ad_id": "a", "ad_id": "b", "status": "paused"}', "the key 'ad_id' appears twice"),
  ]:
    with pytest.raises(ValueError, match=rf"delta.jsonl:2: .*({message})"):
      refresh_delta.parse_lines(['{"ad_id": "ok", "status": "paused"}', line], "delta.jsonl")
  with pytest.raises(ValueError, match="removes"):
    refresh_delta.parse_lines(['{"ad_id": "a", "deleted": true}', '{"ad_id": "a", "status": "paused"}'])
  # Errors found only against the catalog, or across files, name the line too.
  pause = refresh_delta.parse_lines(["", '{"ad_id": "nope", "status": "paused"}'], "b.jsonl")
  with pytest.raises(ValueError, match=r"not in the catalog .*: 'nope' \(b.jsonl:2\)$"):
    pause.check_against({"a"})
  removal = refresh_delta.parse_lines(['{"ad_id": "nope", "deleted": true}'], "a.jsonl")
  with pytest.raises(ValueError, match=r"^b.jsonl:2: status change of ad 'nope', which an earlier line removes"):
    removal.merge(pause)


def test_status_change_tells_a_mask_only_delta_and_whether_it_changes_the_mask():
  row_of = {"a1": 0, "a2": 1}
  eligible = np.array([True, False])

  def change(*lines):
    return refresh_apply.status_change(eligible, row_of, refresh_delta.parse_lines(list(lines)))

  # Adding, changing or removing a present ad needs a rebuild.
  assert change('{"ad_id": "a3", "category": "c", "tokens": ["x"]}') is None
  assert change('{"ad_id": "a1", "deleted": true}', '{"ad_id": "a2", "status": "active"}') is None
  # Removing an ad already gone drops no row.
  resumed = change('{"ad_id": "a2", "status": "active"}', '{"ad_id": "gone", "deleted": true}')
  assert resumed.changed and resumed.eligible.tolist() == [True, True]
  assert resumed.counts == {"status_changes": 1, "ignored_removals": 1}
  assert eligible.tolist() == [True, False]  # The catalog's own mask is left as it was.
  already = change('{"ad_id": "a1", "status": "active"}', '{"ad_id": "gone", "deleted": true}')
  assert not already.changed and already.eligible.tolist() == [True, False]
  with pytest.raises(ValueError, match="not in the catalog"):
    change('{"ad_id": "nope", "status": "paused"}')


def test_a_delta_file_that_is_not_utf8_is_reported_with_its_line(tmp_path):
  path = tmp_path / "delta.jsonl"
  path.write_bytes(b'{"ad_id": "a", "status": "paused"}\n{"ad_id": "caf\xe9", "status": "paused"}\n')
  with pytest.raises(ValueError, match=r"delta.jsonl:2: not valid UTF-8 \(invalid continuation byte: byte 0xe9"):
    refresh_delta.read_delta(str(path))


def test_a_directory_given_as_a_delta_file_is_a_one_line_error(tmp_path):
  with pytest.raises(ValueError, match=rf"^{tmp_path} is not a file \(a directory\?\)"):
    refresh_delta.read_delta(str(tmp_path))  # It was an IsADirectoryError traceback in fgr-refresh.


def test_rebuild_embeds_with_the_served_towers_and_serves_the_new_catalog(exported, served_v1, base_path):
  version_path, source, queries = exported
  loaded, before = served_v1
  features = source.features(np.arange(source.num_items))
  row_of = {ad_id: row for row, ad_id in enumerate(features[schema.AD_ID])}
  # The new ad copies the side info of the first query's best ad: it must rank near the top.
  best, removed, paused = before[0, 0], before[0, 1], before[0, 2]
  changed = features[schema.AD_ID][5]
  delta = refresh_delta.parse_lines(
    [
      delta_testlib.ad_line("fresh-ad", features, row_of[best]),
      json.dumps({"ad_id": removed, "deleted": True}),
      json.dumps({"ad_id": paused, "status": "paused"}),
      delta_testlib.ad_line(changed, features, 9),
      json.dumps({"ad_id": "never-existed", "deleted": True}),
    ]
  )
  report = refresh.Refresher(base_path, keep_versions=None).apply(delta)
  assert report["version"] == 2 and report["kind"] == "rebuild" and report["refreshed_from"] == 1
  assert report["delta"] == {"added": 1, "changed": 1, "removed": 1, "ignored_removals": 1, "status_changes": 1}
  # ScaNN is exact at this size, but its float path and NumPy's may order a tie at the K-th place
  # differently: one of the 4 warm-up queries' 80 ids may differ (the served answers are checked
  # tie-aware below).
  assert report[f"recall_at_{K}_vs_exact_on_warmup_queries"] >= 1 - 1 / 80

  new_path = os.path.join(base_path, "2")
  state = refresh_state.read_state(new_path)
  assert len(state.ids) == source.num_items and "fresh-ad" in state.ids and removed not in state.ids
  # New and changed ads are embedded by version 1's own encode_item, the other rows are kept as they were.
  encode_item = loaded.signatures["encode_item"]
  new_rows = {ad_id: row for row, ad_id in enumerate(state.ids)}
  for ad_id, row in (("fresh-ad", row_of[best]), (changed, 9)):
    inputs = {name: tf.constant(features[name][row : row + 1]) for name in schema.ITEM_FEATURE_NAMES}
    inputs[schema.AD_ID] = tf.constant([ad_id])
    # The refresh encodes its ads in one batch, here each is encoded alone: the kernels may sum in
    # another order (6e-8 apart on one CPU, 1.5e-7 between oneDNN and Eigen). Any other tower's
    # unit vector would be ~0.1 away, so 1e-5 still tells version 1's towers from any other.
    np.testing.assert_allclose(
      state.embeddings[new_rows[ad_id]], encode_item(**inputs)["embedding"].numpy()[0], rtol=0, atol=1e-5
    )
  old_state = refresh_state.read_state(version_path)
  np.testing.assert_array_equal(state.embeddings[new_rows[before[0, 5]]], old_state.embeddings[row_of[before[0, 5]]])
  assert not state.eligible[new_rows[paused]]

  # The towers are version 1's variables, and the version serves the new catalog exactly.
  new_loaded, after = _serve(new_path, queries)
  old_checkpoint = tf.train.load_checkpoint(version_files.variables_prefix(version_path))
  new_checkpoint = tf.train.load_checkpoint(version_files.variables_prefix(new_path))
  tower_keys = [
    key
    for key in old_checkpoint.get_variable_to_shape_map()
    if key.startswith(("query_tower/", "item_tower/")) and key.endswith("VARIABLE_VALUE")
  ]
  assert len(tower_keys) > 5
  # ScaNN with version 1's search knobs: version 1's graph file serves the new checkpoint, untraced.
  assert report["graph"] == "version 1's"
  assert os.path.samefile(os.path.join(version_path, "saved_model.pb"), os.path.join(new_path, "saved_model.pb"))
  for key in tower_keys:
    np.testing.assert_array_equal(old_checkpoint.get_tensor(key), new_checkpoint.get_tensor(key))
  assert removed not in after and paused not in after and "" not in after
  query_embeddings = new_loaded.signatures["encode_query"](**{n: tf.constant(v) for n, v in queries.items()})[
    "embedding"
  ]
  scores = topk_testlib.reference_scores(query_embeddings.numpy(), state.embeddings, state.eligible)
  expected_rows = np.argsort(-scores, axis=1, kind="stable")[:, :K]
  topk_testlib.assert_top_k_agree(topk_testlib.rows_of(after, state.ids), expected_rows, scores)
  # The fresh ad has the best ad's side info but not its id: it is served, within 0.05 of the best
  # score (when written: second, 0.018 below; the ads after it 0.006 apart, too close to pin its
  # rank across CPUs, whose kernels round the training differently).
  assert "fresh-ad" in after[0] and scores[0, new_rows["fresh-ad"]] >= scores[0].max() - 0.05


def test_status_only_publish_changes_only_the_mask(exported, served_v1, base_path):
  version_path, _, queries = exported
  _, before = served_v1
  pause = before[:, 0]
  delta = refresh_delta.parse_lines([json.dumps({"ad_id": ad_id, "status": "paused"}) for ad_id in pause])
  refresher = refresh.Refresher(base_path, keep_versions=None)
  report = refresher.apply(delta)
  assert report["kind"] == "status_only" and report["version"] == 2
  # The towers are version 1's, and so is what serving them needs.
  source = version_report.read(version_path)
  assert (report["precision"], report["jit_compile"], report["needs_xla"]) == (
    source.precision,
    source.jit_compile,
    source.needs_xla,
  ) and source.needs_xla is not None
  new_path = os.path.join(base_path, "2")
  # The graph is version 1's byte for byte; of the variables only the eligibility mask differs.
  with (
    open(os.path.join(version_path, "saved_model.pb"), "rb") as a,
    open(os.path.join(new_path, "saved_model.pb"), "rb") as b,
  ):
    assert a.read() == b.read()
  assert checkpoint_testlib.differing_tensors(version_path, new_path) == [full_graph.ELIGIBLE_KEY]
  _, after = _serve(new_path, queries)
  assert not set(pause) & set(after.ravel())

  # Resuming brings them back; an unknown ad's status change is refused before anything is written.
  refresher.apply(refresh_delta.parse_lines([json.dumps({"ad_id": ad_id, "status": "active"}) for ad_id in pause]))
  np.testing.assert_array_equal(_serve(os.path.join(base_path, "3"), queries)[1], before)
  with pytest.raises(ValueError, match="not in the catalog"):
    refresher.apply(refresh_delta.parse_lines(['{"ad_id": "nope", "status": "paused"}']))
  assert versions.list_versions(base_path) == [1, 2, 3]
  # A delta that changes nothing publishes nothing: resuming active ads, removing an ad that is not
  # there (a delta applied twice).
  resumed = [json.dumps({"ad_id": ad_id, "status": "active"}) for ad_id in pause]
  report = refresher.apply(refresh_delta.parse_lines([*resumed, '{"ad_id": "long-gone", "deleted": true}']))
  assert report == {
    "version": 3,
    "path": os.path.join(base_path, "3"),
    "kind": "unchanged",
    "published": False,
    "delta": {"statuses_already_set": len(set(pause)), "ignored_removals": 1},
  }
  assert versions.list_versions(base_path) == [1, 2, 3]
  # Pausing one of them again is a change: the fast path publishes it.
  report = refresher.apply(refresh_delta.parse_lines([resumed[0].replace("active", "paused")]))
  assert report["kind"] == "status_only" and report["version"] == 4


def test_rollback_republishes_and_keep_versions_prunes(exported, served_v1, base_path):
  _, _, queries = exported
  _, before = served_v1
  refresher = refresh.Refresher(base_path, keep_versions=2)
  refresher.apply(refresh_delta.parse_lines([json.dumps({"ad_id": before[0, 0], "status": "paused"})]))
  refresher.apply(refresh_delta.parse_lines([json.dumps({"ad_id": before[0, 1], "deleted": True})]))
  assert versions.list_versions(base_path) == [2, 3]
  report = refresher.rollback(2)
  assert report["version"] == 4 and report["kind"] == "rollback" and report["refreshed_from"] == 2
  assert versions.list_versions(base_path) == [3, 4]
  assert not [name for name in os.listdir(base_path) if not name.isdigit()]  # No hidden leftovers.
  _, rolled_back = _serve(os.path.join(base_path, "4"), queries)
  assert before[0, 0] not in rolled_back[0] and before[0, 1] in rolled_back[0]
  with pytest.raises(FileNotFoundError, match=r"No version 1 under .* \(it has \[3, 4\]\): check --from_version"):
    refresh.Refresher(base_path, from_version=1).source()  # Pruned: named as missing, not as a broken version.
  # The next refresh starts from the rollback (the newest version), not from the refresher's memory.
  report = refresher.apply(refresh_delta.parse_lines([json.dumps({"ad_id": before[0, 0], "status": "active"})]))
  assert report["refreshed_from"] == 4
  np.testing.assert_array_equal(_serve(os.path.join(base_path, "5"), queries)[1][0], before[0])


def test_a_refresh_overtaken_by_another_writer_publishes_nothing(exported, served_v1, base_path, monkeypatch):
  """Two writers on one base path: a refresh that read version 1 must not publish over a version 2 another
  writer published meanwhile (its pause would be undone, as an export would be replaced by old towers)."""
  _, _, queries = exported
  _, before = served_v1
  publish = refresh.refresh_publish.publish_status_only

  def overtaken(base, source, eligible, version=None):
    monkeypatch.setattr(refresh.refresh_publish, "publish_status_only", publish)
    refresh.Refresher(base, keep_versions=None).apply(  # Another writer, while this refresh runs.
      refresh_delta.parse_lines([json.dumps({"ad_id": before[0, 1], "status": "paused"})])
    )
    return publish(base, source, eligible, version)

  monkeypatch.setattr(refresh.refresh_publish, "publish_status_only", overtaken)
  refresher = refresh.Refresher(base_path, keep_versions=None)
  pause_first = refresh_delta.parse_lines([json.dumps({"ad_id": before[0, 0], "status": "paused"})])
  with pytest.raises(FileExistsError, match=r"Version 2 already exists .*started from version 1\)"):
    refresher.apply(pause_first)
  assert versions.list_versions(base_path) == [1, 2]
  # Run again, it starts from the newest version: both pauses hold.
  report = refresher.apply(pause_first)
  assert (report["version"], report["refreshed_from"]) == (3, 2)
  _, after = _serve(os.path.join(base_path, "3"), queries)
  assert not {before[0, 0], before[0, 1]} & set(after.ravel())


def test_two_writers_renaming_to_one_version_fail_cleanly(tmp_path):
  """The rename race itself: the loser gets a FileExistsError saying so, not ENOTEMPTY, and leaves nothing."""
  base = str(tmp_path / "models")
  with pytest.raises(FileExistsError, match="Version 1 was published .* by another writer while this one"):
    with versions.publish(base) as (temp_path, version):
      os.makedirs(temp_path)
      open(os.path.join(temp_path, "saved_model.pb"), "w").close()
      os.makedirs(os.path.join(base, str(version)))  # The other writer's rename lands first.
      open(os.path.join(base, str(version), "saved_model.pb"), "w").close()
  assert sorted(os.listdir(base)) == ["1"]


def test_deferred_prune_deletes_when_the_next_publish_starts(served_v1, base_path):
  _, before = served_v1
  refresher = refresh.Refresher(base_path, keep_versions=1, defer_prune=True)
  refresher.apply(refresh_delta.parse_lines([json.dumps({"ad_id": before[0, 0], "status": "paused"})]))
  assert versions.list_versions(base_path) == [1, 2]  # Version 1 stays while servers load version 2.
  refresher.apply(refresh_delta.parse_lines([json.dumps({"ad_id": before[0, 0], "status": "active"})]))
  assert versions.list_versions(base_path) == [2, 3]


def test_watch_publishes_good_files_and_skips_bad_ones_whole(exported, served_v1, base_path, tmp_path, caplog):
  _, _, queries = exported
  _, before = served_v1
  watch_dir = tmp_path / "deltas"
  watch_dir.mkdir()
  (watch_dir / "001-pause.jsonl").write_text(json.dumps({"ad_id": before[0, 0], "status": "paused"}) + "\n")
  (watch_dir / "002-bad.jsonl").write_text(json.dumps({"ad_id": before[0, 1], "status": "paused"}) + "\n{oops\n")
  (watch_dir / "003-unknown.jsonl").write_text(
    json.dumps({"ad_id": before[0, 2], "deleted": True}) + "\n" + '{"ad_id": "nope", "status": "paused"}\n'
  )
  (watch_dir / ".004-incomplete.jsonl").write_text('{"ad_id": "x", "deleted": true}\n')
  polls = []

  def on_poll(result: refresh_watch.PollResult) -> None:
    polls.append(result)
    if len(polls) == 1:  # The first file again, for the second poll: it changes nothing.
      (watch_dir / "005-again.jsonl").write_text((watch_dir / "processed" / "v2-001-pause.jsonl").read_text())

  # Every file is written before its poll, so a short settle time takes them as the default 2 s would
  # (the settling itself: the tests of Settle below), without the 2 s wait.
  with caplog.at_level(logging.INFO, logger="absl"):
    refresh_watch.watch(
      refresh.Refresher(base_path),
      str(watch_dir),
      interval_seconds=0.1,
      max_polls=3,
      on_poll=on_poll,
      settle_seconds=0.05,
    )
  assert f"Watching {watch_dir} for delta files" in caplog.text  # Once ready: bench/freshness.py waits for it.
  assert polls[0].accepted == ["001-pause.jsonl"] and set(polls[0].rejected) == {"002-bad.jsonl", "003-unknown.jsonl"}
  assert polls[0].report["version"] == 2
  assert polls[1].accepted == ["005-again.jsonl"] and polls[1].report["published"] is False
  assert polls[2].report is None  # Nothing new at the third poll.
  assert versions.list_versions(base_path) == [1, 2]
  assert sorted(os.listdir(watch_dir / "processed")) == ["unchanged-005-again.jsonl", "v2-001-pause.jsonl"]
  assert sorted(os.listdir(watch_dir / "failed")) == [
    "002-bad.jsonl",
    "002-bad.jsonl.error",
    "003-unknown.jsonl",
    "003-unknown.jsonl.error",
  ]
  assert "002-bad.jsonl:2" in (watch_dir / "failed" / "002-bad.jsonl.error").read_text()
  assert ".004-incomplete.jsonl" in os.listdir(watch_dir)  # Hidden names are still being written.
  _, after = _serve(os.path.join(base_path, "2"), queries)
  assert before[0, 0] not in after  # Applied.
  assert before[0, 1] in after[0] and before[0, 2] in after[0]  # Neither bad file applied even in part.


def test_watch_keeps_going_past_a_delta_that_cannot_be_published(exported, served_v1, base_path, tmp_path):
  """A file that parses but leaves fewer ads than k failed every poll, merged with (and so holding back)
  every later file; a second rejected file of a name replaced the first; a file still being written was
  published in part and moved, its later lines never applied."""
  _, _, queries = exported
  _, before = served_v1
  watch_dir = tmp_path / "deltas"
  watch_dir.mkdir()
  ids = refresh_state.read_state(os.path.join(base_path, "1")).ids
  keep = set(before[0, :3]) | set(ids[:10])
  too_much = "".join(json.dumps({"ad_id": ad_id, "deleted": True}) + "\n" for ad_id in ids if ad_id not in keep)
  (watch_dir / "001-delete-nearly-all.jsonl").write_text(too_much)
  (watch_dir / "002-pause.jsonl").write_text(json.dumps({"ad_id": before[0, 0], "status": "paused"}) + "\n")
  (watch_dir / "003-bad.jsonl").write_text("{oops\n")
  refresher = refresh.Refresher(base_path, keep_versions=None)
  result = refresh_watch.poll_once(refresher, str(watch_dir), WRITTEN)
  assert result.accepted == ["002-pause.jsonl"]
  assert list(result.rejected) == ["003-bad.jsonl", "001-delete-nearly-all.jsonl"]
  assert result.report["version"] == 2 and "fewer than the k = 20" in result.rejected["001-delete-nearly-all.jsonl"]
  assert before[0, 0] not in _serve(os.path.join(base_path, "2"), queries)[1][0]

  for _ in range(2):  # The same bad name twice: both files and both notes are kept.
    (watch_dir / "bad.jsonl").write_text("{oops\n")
    refresh_watch.poll_once(refresher, str(watch_dir), WRITTEN)
  assert {"bad.jsonl", "bad.jsonl.error", "bad-2.jsonl", "bad-2.jsonl.error"} <= set(os.listdir(watch_dir / "failed"))

  # A writer appends while the first lines are applied: the file stays, and the next poll applies it whole.
  slow = watch_dir / "004-slow.jsonl"
  slow.write_text(json.dumps({"ad_id": before[0, 1], "status": "paused"}) + "\n")
  apply = refresher.apply

  def apply_while_written(delta):
    with open(slow, "a") as f:
      f.write(json.dumps({"ad_id": before[0, 2], "status": "paused"}) + "\n")
    return apply(delta)

  refresher.apply = apply_while_written
  assert refresh_watch.poll_once(refresher, str(watch_dir), WRITTEN).report["version"] == 3
  refresher.apply = apply
  assert slow.exists()
  assert refresh_watch.poll_once(refresher, str(watch_dir), WRITTEN).report["version"] == 4
  assert not slow.exists() and not {before[0, 1], before[0, 2]} & set(
    _serve(os.path.join(base_path, "4"), queries)[1][0]
  )


def test_utf8_ids_refresh_end_to_end_and_long_ids_are_refused(exported, base_path, tmp_path):
  """Any UTF-8 id is served as its UTF-8 bytes (NumPy's astype(bytes) refused non-ASCII after the
  embedding), and one long id does not make reading the catalog scale with its length."""
  import tracemalloc

  _, source, queries = exported
  features = source.features(np.arange(source.num_items))
  _, before = _serve(os.path.join(base_path, "1"), queries)
  best = {ad_id: row for row, ad_id in enumerate(features[schema.AD_ID])}[before[0, 0]]
  longest = "x" * logs.MAX_STRING_BYTES
  delta_path = tmp_path / "delta.jsonl"
  delta_path.write_text(
    delta_testlib.ad_line("广告-1", features, best) + "\n" + delta_testlib.ad_line(longest, features, 7) + "\n",
    encoding="utf-8",
  )
  refresher = refresh.Refresher(base_path, keep_versions=None)
  assert refresher.apply(refresh_delta.read_delta(str(delta_path)))["delta"]["added"] == 2

  def first_answer(version):
    loaded = tf.saved_model.load(os.path.join(base_path, str(version)))
    return loaded.signatures["serving_default"](**{n: tf.constant(v) for n, v in queries.items()})["ids"].numpy()[0]

  assert "广告-1".encode() in first_answer(2).tolist()
  # Reading the catalog holds each id once: a fixed-width copy would take 4 bytes x 1,024 per ad.
  tracemalloc.start()
  try:
    state = refresh_state.read_state(os.path.join(base_path, "2"))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert "广告-1" in state.row_of() and longest in state.row_of()
  assert peak < len(state.ids) * logs.MAX_STRING_BYTES
  # A status change of the UTF-8 id publishes too.
  refresher.apply(refresh_delta.parse_lines([json.dumps({"ad_id": "广告-1", "status": "paused"})]))
  assert "广告-1".encode() not in first_answer(3).tolist()

  # One byte more is refused when the line is read, naming the file, the line and the limit.
  too_long = tmp_path / "too_long.jsonl"
  too_long.write_text('{"ad_id": "a1", "status": "paused"}\n' + json.dumps({"ad_id": "é" * 513, "status": "paused"}))
  with pytest.raises(ValueError, match=r"too_long.jsonl:2: 'ad_id' holds a string of 1,026 bytes, more than the 1,024"):
    refresh_delta.read_delta(str(too_long))
  for field in ('"category": "{}"', '"tokens": ["ok", "{}"]'):
    line = '{"ad_id": "a1", ' + field.format("c" * 1025) + "}"
    with pytest.raises(ValueError, match=r"delta.jsonl:1: '(category|tokens)' holds a string of 1,025 bytes"):
      refresh_delta.parse_lines([line], "delta.jsonl")


def _pauses(ids, status="paused"):
  return "".join(json.dumps({"ad_id": ad_id, "status": status}) + "\n" for ad_id in ids)


def test_watch_leaves_a_file_being_written_until_it_settles(base_path, tmp_path):
  """A writer that does not rename: a poll in the middle of its file published the lines flushed so far
  and moved the file to processed/ (the rest never applied), or moved it to failed/ when the block
  ended mid-line. Now a file that changes while the poll looks twice waits for the next poll."""
  ids = refresh_state.read_state(os.path.join(base_path, "1")).ids[:40].tolist()
  watch_dir = tmp_path / "deltas"
  watch_dir.mkdir()
  refresher = refresh.Refresher(base_path, keep_versions=None)
  # Nothing sleeps here: a writer's next block lands while the poll waits out the settle time.
  settled_at_once = refresh_watch.Settle(60, sleep=lambda _: None)
  for name, text in (("pauses.jsonl", _pauses(ids[:20])), ("more.jsonl", _pauses(ids[20:], "paused"))):
    cut = len(_pauses(ids[:10])) if name == "pauses.jsonl" else len(text) - 5  # A line boundary, then mid-line.
    path = watch_dir / name
    path.write_text(text[:cut])

    def writer_finishes(_, path=path, text=text):
      path.write_text(text)

    result = refresh_watch.poll_once(refresher, str(watch_dir), refresh_watch.Settle(60, sleep=writer_finishes))
    assert result.waiting == [name] and not result.accepted and not result.rejected and result.report is None
    assert refresh_watch.pending_files(str(watch_dir)) == [name] and not os.path.exists(watch_dir / "failed")
    result = refresh_watch.poll_once(refresher, str(watch_dir), settled_at_once)
    assert result.accepted == [name] and not result.waiting
  state = refresh_state.read_state(os.path.join(base_path, "3"))
  assert not state.eligible[[state.row_of()[ad_id] for ad_id in ids]].any()  # Every line of both files applied.
  assert sorted(os.listdir(watch_dir / "processed")) == ["v2-pauses.jsonl", "v3-more.jsonl"]


def test_watch_applies_a_file_that_changed_after_it_was_read_again_with_the_files_after_it(base_path, tmp_path):
  """A writer that paused longer than the settle time appends while the file is applied: it stays, and
  so does every later file of the poll, so that the next poll applies them again in the same order."""
  a, b, c = refresh_state.read_state(os.path.join(base_path, "1")).ids[:3].tolist()
  watch_dir = tmp_path / "deltas"
  watch_dir.mkdir()
  first = watch_dir / "001.jsonl"
  first.write_text(_pauses([a, c]))
  (watch_dir / "002.jsonl").write_text(_pauses([a], "active") + json.dumps({"ad_id": c, "deleted": True}) + "\n")
  refresher = refresh.Refresher(base_path, keep_versions=None)
  apply = refresher.apply

  def apply_while_written(delta):
    with open(first, "a") as f:
      f.write(_pauses([b]))
    return apply(delta)

  refresher.apply = apply_while_written
  result = refresh_watch.poll_once(refresher, str(watch_dir), WRITTEN)
  refresher.apply = apply
  assert result.report["version"] == 2 and result.waiting == ["001.jsonl", "002.jsonl"]
  assert refresh_watch.pending_files(str(watch_dir)) == ["001.jsonl", "002.jsonl"]
  # Applied again, together: 002's resume of `a` still comes last, and 001's pause of `c`, which 002
  # removes, is no error (checked alone against version 2, 001 would go to failed/, its `b` lost).
  result = refresh_watch.poll_once(refresher, str(watch_dir), WRITTEN)
  assert result.accepted == ["001.jsonl", "002.jsonl"] and not result.rejected and result.report["version"] == 3
  state = refresh_state.read_state(os.path.join(base_path, "3"))
  row_of = state.row_of()
  assert state.eligible[row_of[a]] and not state.eligible[row_of[b]] and c not in row_of
  assert sorted(os.listdir(watch_dir / "processed")) == ["v3-001.jsonl", "v3-002.jsonl"]


def test_settle_takes_a_file_seen_unchanged_long_enough_ago_without_waiting(tmp_path):
  (tmp_path / "a.jsonl").write_text("{}\n")
  waits = []
  settle = refresh_watch.Settle(0.05, sleep=waits.append)
  assert list(settle.settled(str(tmp_path), ["a.jsonl"])) == ["a.jsonl"] and len(waits) == 1
  time.sleep(0.06)  # Past the settle time since the first look.
  assert list(settle.settled(str(tmp_path), ["a.jsonl", "gone.jsonl"])) == ["a.jsonl"] and len(waits) == 1
  (tmp_path / "a.jsonl").write_text("{}\n{}\n")  # Changed: looked at twice again.
  assert list(settle.settled(str(tmp_path), ["a.jsonl"])) == ["a.jsonl"] and len(waits) == 2


def test_processed_and_failed_files_are_kept_up_to_a_number_and_names_found_in_few_lookups(tmp_path, monkeypatch):
  failed = tmp_path / refresh_watch.FAILED_DIR
  for _ in range(40):  # The same name rejected 40 times: bad.jsonl, bad-2.jsonl ... bad-40.jsonl.
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    refresh_watch._reject(str(tmp_path), "bad.jsonl", ValueError("bad"), refresh_watch.PollResult())
  lookups = []
  exists = os.path.exists
  monkeypatch.setattr(refresh_watch.os.path, "exists", lambda path: lookups.append(path) or exists(path))
  assert refresh_watch._free_name(str(failed), "bad.jsonl") == "bad-41.jsonl" and len(lookups) < 30
  monkeypatch.undo()
  # Oldest first by when each was set aside (its mtime); a note goes with its file.
  for n, name in enumerate(["bad.jsonl"] + [f"bad-{i}.jsonl" for i in range(2, 41)]):
    for path in (failed / name, failed / (name + ".error")):
      os.utime(path, ns=(n * 10**9, n * 10**9))
  (failed / "README").write_text("not ours")
  processed = tmp_path / refresh_watch.PROCESSED_DIR
  processed.mkdir()
  (processed / "v2-a.jsonl").write_text("{}\n")
  refresh_watch.prune_kept(str(tmp_path), 3)
  assert sorted(os.listdir(failed)) == sorted(
    ["README"] + [f"bad-{i}.jsonl{note}" for i in (38, 39, 40) for note in ("", ".error")]
  )
  assert os.listdir(processed) == ["v2-a.jsonl"]
  assert refresh_watch._free_name(str(failed), "bad.jsonl") == "bad.jsonl"  # Free again.
  refresh_watch.prune_kept(str(tmp_path), 0)  # 0 keeps all.
  assert len(os.listdir(failed)) == 7


def test_a_version_replaced_under_the_same_number_is_read_again(base_path, monkeypatch):
  """The operator deletes the newest version (not --rollback) and another writer publishes under its
  number: a resident refresher built on its memory of the deleted one (undoing the other writer's
  change, bringing back the deleted one's) and kept its towers."""
  a, b, c = refresh_state.read_state(os.path.join(base_path, "1")).ids[:3].tolist()
  loads = []
  load = refresh.refresh_towers.LoadedTowers.load
  monkeypatch.setattr(refresh.refresh_towers.LoadedTowers, "load", lambda path: loads.append(path) or load(path))
  watcher = refresh.Refresher(base_path, keep_versions=5, defer_prune=True)  # As fgr-refresh --watch.
  watcher.prepare()
  watcher.apply(refresh_delta.parse_lines([_pauses([a]).strip()]))
  watcher.prepare()
  assert len(loads) == 1  # Its own version 2 shares the towers it loaded.
  versions.remove_version(base_path, 2)
  other = refresh.Refresher(base_path, from_version=1)
  assert other.apply(refresh_delta.parse_lines([_pauses([b]).strip()]))["version"] == 2
  watcher.prepare()
  assert len(loads) == 2 and loads[-1] == os.path.join(base_path, "2")
  report = watcher.apply(refresh_delta.parse_lines([_pauses([c]).strip()]))
  assert (report["version"], report["refreshed_from"]) == (3, 2)
  state = refresh_state.read_state(os.path.join(base_path, "3"))
  row_of = state.row_of()
  assert state.eligible[row_of[a]] and not state.eligible[row_of[b]] and not state.eligible[row_of[c]]


@pytest.mark.parametrize("damage", ["truncated", "no_variables"])
def test_a_damaged_newest_version_is_one_clear_error_and_publishes_nothing(exported, served_v1, base_path, damage):
  """A checkpoint TF cannot read was an IndexError or RuntimeError traceback in TF's own words."""
  _, before = served_v1
  damaged = os.path.join(base_path, "2")
  version_files.link_tree(os.path.join(base_path, "1"), damaged)
  data = next(
    os.path.join(damaged, "variables", name)
    for name in os.listdir(os.path.join(damaged, "variables"))
    if name.startswith("variables.data")
  )
  if damage == "truncated":
    with open(data, "rb") as f:
      head = f.read(1000)
    os.remove(data)  # A hard link to the fixture's file: replace it, never write through.
    with open(data, "wb") as f:
      f.write(head)
  else:
    for name in os.listdir(os.path.join(damaged, "variables")):
      os.remove(os.path.join(damaged, "variables", name))
    os.rmdir(os.path.join(damaged, "variables"))
  delta = refresh_delta.parse_lines([json.dumps({"ad_id": before[0, 0], "status": "paused"})])
  with pytest.raises(
    ValueError, match=r"2: its checkpoint cannot be read \(.*\); the version is damaged or half-written"
  ):
    refresh.Refresher(base_path).apply(delta)
  assert versions.list_versions(base_path) == [1, 2]


def test_a_damaged_report_is_not_blamed_on_index_options(base_path):
  """fgr-refresh printed a damaged report's error as a mistake in --index_options, with the usage text."""
  with pytest.raises(refresh.IndexOptionsError, match="no_such_option"):
    refresh.Refresher(base_path, index_overrides={"no_such_option": 1}).check_index_overrides()
  report_path = version_report.path(os.path.join(base_path, "1"))
  with open(report_path) as f:
    text = f.read()
  os.remove(report_path)  # A hard link to the fixture's report: replace it, never write through.
  with open(report_path, "w") as f:
    f.write(text[:100])
  with pytest.raises(ValueError, match="is not JSON") as info:
    refresh.Refresher(base_path).check_index_overrides()
  assert not isinstance(info.value, refresh.IndexOptionsError)
