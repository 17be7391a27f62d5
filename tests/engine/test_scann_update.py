"""Incremental ScaNN updates: ScaNN's own encoding of changed rows, and recall against a full rebuild."""

import numpy as np
import pytest
import tensorflow as tf

from bench import catalog
from engine import scann_index, scann_update, search_ops


def _recall(index, queries, items, k):
  found = tf.function(lambda q: index.search(q, k).indices)(tf.constant(queries)).numpy()
  return search_ops.recall_at_k(found, search_ops.exact_top_k_numpy(queries, items, k))


@pytest.mark.parametrize(
  "options",
  [
    {},
    {"num_leaves": 0, "scoring": "ah", "reorder": 100},
    {"num_leaves": 40, "scoring": "ah", "reorder": 100},
    {"num_leaves": 40, "scoring": "ah", "reorder": 100, "partitioning": "generic"},
  ],
  ids=["brute_force", "ah", "tree_ah_spherical", "tree_ah_generic"],
)
def test_reencoding_rows_reproduces_the_built_assets(options):
  items, _ = catalog.synthetic_catalog(4000, 16, num_queries=8, seed=3)
  index = scann_index.build_scann(items, k=10, leaves_to_search=8 if options.get("num_leaves") else 0, **options)
  assets = scann_update.ScannAssets.from_state(index.state)
  # Every third row "changed" (encoded again from the same vector): the result must be the build's.
  source_rows = np.arange(len(items))
  source_rows[::3] = -1
  updated = scann_update.update(assets, items, source_rows)
  for name in scann_update.ASSET_NAMES:
    np.testing.assert_array_equal(getattr(updated, name), getattr(assets, name), err_msg=name)
  assert updated.has_tree == bool(options.get("num_leaves")) and updated.has_ah == bool(options)
  # Removals only: nothing to encode, the kept rows' assets are copied.
  kept = np.arange(0, len(items), 2)
  removed = scann_update.update(assets, items[kept], kept)
  for name in ("datapoint_to_token", "hashed_dataset", "dataset"):
    value = getattr(assets, name)
    np.testing.assert_array_equal(getattr(removed, name), value[kept] if value.ndim else value, err_msg=name)


def test_incremental_update_keeps_recall_of_a_full_rebuild():
  k = 10
  items, queries = catalog.synthetic_catalog(24000, 32, num_queries=300, seed=4)
  old, new = items[:20000], items[20000:]
  index = scann_index.build_scann(old, k=k, num_leaves=100, training_sample_size=20000, tuning_queries=queries[:100])
  # The next catalog (20% of it new to the index): 1,000 rows removed, 1,000 changed to unseen
  # vectors, 3,000 unseen vectors appended.
  rng = np.random.default_rng(0)
  removed, changed = np.split(rng.choice(len(old), 2000, replace=False), 2)
  keep = np.ones(len(old), bool)
  keep[removed] = False
  embeddings = old.copy()
  embeddings[changed] = new[:1000]
  embeddings = np.concatenate([embeddings[keep], new[1000:]])
  source_rows = np.flatnonzero(keep)
  source_rows[np.isin(source_rows, changed)] = -1
  source_rows = np.concatenate([source_rows, np.full(len(new) - 1000, -1)])
  assert len(source_rows) == len(embeddings) and (source_rows < 0).sum() == len(new)

  updated = scann_update.update(scann_update.ScannAssets.from_state(index.state), embeddings, source_rows)
  assert updated.num_rows == len(embeddings)
  np.testing.assert_array_equal(
    updated.datapoint_to_token[source_rows >= 0], index.state.datapoint_to_token.numpy()[source_rows[source_rows >= 0]]
  )
  incremental = scann_update.index_from_assets(updated, index.config)
  full = scann_index.build_scann(
    embeddings,
    k=k,
    num_leaves=100,
    training_sample_size=20000,
    leaves_to_search=index.config["leaves_to_search"],
    reorder=index.config["reorder"],
  )
  held_out = queries[100:]
  incremental_recall, full_recall = (
    _recall(incremental, held_out, embeddings, k),
    _recall(full, held_out, embeddings, k),
  )
  print(f"recall@{k}: incremental {incremental_recall:.3f}, full rebuild {full_recall:.3f}")
  assert incremental_recall >= 0.85
  assert incremental_recall >= full_recall - 0.03, (incremental_recall, full_recall)
  # The new rows are found: each one's own vector as a query returns it.
  rows = np.flatnonzero(source_rows < 0)[:50]
  found = tf.function(lambda q: incremental.search(q, k).indices)(tf.constant(embeddings[rows])).numpy()
  assert np.mean([row in hits for row, hits in zip(rows, found)]) >= 0.95


def test_bad_inputs_raise_clear_errors():
  items, _ = catalog.synthetic_catalog(3000, 16, num_queries=4, seed=5)
  index = scann_index.build_scann(items, k=10, num_leaves=20, scoring="ah", reorder=50, leaves_to_search=4)
  assets = scann_update.ScannAssets.from_state(index.state)
  with pytest.raises(ValueError, match="source rows"):
    scann_update.update(assets, items, np.arange(10))
  with pytest.raises(ValueError, match="outside"):
    scann_update.update(assets, items[:5], np.array([0, 1, 2, 3, 3000]))
  with pytest.raises(ValueError, match="dimensions"):
    scann_update.encode_rows(assets, np.zeros([2, 8], np.float32))
