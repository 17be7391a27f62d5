"""The towers: shapes, normalisation, padding invariance and the restore path used by export."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from models import config as config_lib
from models import layers, towers, train
from models.data import schema
from tests.conftest import TINY_TOWER


def _query_batch(hist_ids, hist_categories):
  return {
    schema.USER_ID: tf.constant(["u1", "u2"]),
    schema.USER_FEATURES: tf.constant([["age:18-24", ""], ["", ""]]),
    schema.QUERY_TOKENS: tf.constant([["t1_2", "t1_3"], ["t2_1", ""]]),
    schema.HIST_IDS: tf.constant(hist_ids),
    schema.HIST_CATEGORIES: tf.constant(hist_categories),
    schema.HIST_BRANDS: tf.constant([["b1_1", "", ""], ["", "", ""]]),
  }


def test_query_tower_outputs_unit_vectors_and_accepts_any_sequence_length():
  query_tower, _ = towers.build_towers(TINY_TOWER)
  out = query_tower(_query_batch([["ad1", "", ""], ["", "", ""]], [["c1", "", ""], ["", "", ""]]))
  assert out.shape == (2, TINY_TOWER.output_dim)
  np.testing.assert_allclose(np.linalg.norm(out.numpy(), axis=1), 1.0, rtol=1e-5)


def test_item_tower_embeds_unseen_ads_from_side_info():
  _, item_tower = towers.build_towers(TINY_TOWER)
  batch = {
    schema.AD_ID: tf.constant(["ad-new-1", "ad-new-2"]),
    schema.CATEGORY: tf.constant(["c1", "c1"]),
    schema.BRAND: tf.constant(["b1", "b1"]),
    schema.AD_TOKENS: tf.constant([["t1", ""], ["t1", ""]]),
  }
  out = item_tower(batch).numpy()
  assert out.shape == (2, TINY_TOWER.output_dim) and np.all(np.isfinite(out))


def test_mean_pooling_variant_builds():
  query_tower, _ = towers.build_towers(dataclasses.replace(TINY_TOWER, sequence_pooling="mean"))
  history = _query_batch([["ad1", "", ""], ["", "", ""]], [["c1", "", ""], ["", "", ""]])
  assert query_tower(history).shape == (2, TINY_TOWER.output_dim)


def test_restore_reproduces_the_trained_towers(trained_run):
  model, run_config = train.restore(trained_run)
  assert run_config["tower"] == TINY_TOWER
  again, _ = train.restore(trained_run)
  batch = _query_batch([["ad1", "ad2", ""], ["", "", ""]], [["c1", "c2", ""], ["", "", ""]])
  np.testing.assert_allclose(model.query_tower(batch).numpy(), again.query_tower(batch).numpy())


def _history_batch(hist_ids, hist_categories, hist_brands):
  return {**_query_batch(hist_ids, hist_categories), schema.HIST_BRANDS: tf.constant(hist_brands)}


def test_separate_side_info_encoder_masks_padding():
  query_tower, _ = towers.build_towers(dataclasses.replace(TINY_TOWER, side_info="separate"))
  short = query_tower(_history_batch([["ad1"], ["ad2"]], [["c1"], ["c2"]], [["b1"], [""]])).numpy()
  padded = query_tower(
    _history_batch([["ad1", "", ""], ["ad2", "", ""]], [["c1", "", ""], ["c2", "", ""]], [["b1", "", ""], ["", "", ""]])
  ).numpy()
  np.testing.assert_allclose(short, padded, atol=1e-6)  # Padding adds nothing on either path.
  # A past click known only by its side info (no id) still counts on the side-info path.
  empty = query_tower(_history_batch([[""], [""]], [[""], [""]], [[""], [""]])).numpy()
  side_only = query_tower(_history_batch([[""], [""]], [["c1"], ["c2"]], [[""], [""]])).numpy()
  assert np.all(np.isfinite(empty))
  assert np.abs(side_only - empty).max() > 1e-4


def test_separate_side_info_adds_its_own_attention_and_legacy_runs_keep_summed_towers(tmp_path):
  separate, _ = towers.build_towers(dataclasses.replace(TINY_TOWER, side_info="separate"))
  summed, _ = towers.build_towers(dataclasses.replace(TINY_TOWER, side_info="summed"))
  assert hasattr(separate, "side_attention") and not hasattr(summed, "side_attention")
  # config.json files written before these fields existed rebuild the towers they were trained with.
  legacy = {
    k: v
    for k, v in dataclasses.asdict(TINY_TOWER).items()
    if k not in ("attention", "side_info", "features", "precision")
  }
  config_lib.write_run_config(str(tmp_path), TINY_TOWER, {}, {})
  with open(tmp_path / config_lib.CONFIG_FILE) as f:
    written = json.load(f)
  written["tower"] = legacy
  with open(tmp_path / config_lib.CONFIG_FILE, "w") as f:
    json.dump(written, f)
  tower = config_lib.read_run_config(str(tmp_path))["tower"]
  assert (tower.side_info, tower.attention, tower.features, tower.precision) == ("summed", "dot", "full", "float32")


def test_runs_from_before_the_sequence_encoder_rebuild_without_it(tmp_path):
  encoder = dataclasses.replace(TINY_TOWER, sequence_encoder="self_attention", attention_target="query_and_latest")
  assert hasattr(towers.build_towers(encoder)[0], "sequence_encoder")
  config_lib.write_run_config(str(tmp_path), encoder, {}, {})
  with open(tmp_path / config_lib.CONFIG_FILE) as f:
    written = json.load(f)
  for name in ("sequence_encoder", "attention_target"):
    del written["tower"][name]
  with open(tmp_path / config_lib.CONFIG_FILE, "w") as f:
    json.dump(written, f)
  tower = config_lib.read_run_config(str(tmp_path))["tower"]
  assert (tower.sequence_encoder, tower.attention_target) == ("none", "query")
  query_tower, _ = towers.build_towers(tower)
  assert not hasattr(query_tower, "sequence_encoder")


def test_sequence_encoder_reads_order_and_masks_padding():
  encoder = layers.SequenceEncoder(num_layers=2, num_heads=2, max_len=8, dropout=0.0)
  items = tf.random.stateless_normal([1, 3, 8], seed=[1, 2])
  mask = tf.constant([[True, True, False]])
  out = encoder(items, mask).numpy()
  assert np.all(out[0, 2] == 0.0)  # Padding comes out as zeros...
  noise = tf.concat([items[:, :2], tf.fill([1, 1, 8], 9.0)], axis=1)
  np.testing.assert_allclose(encoder(noise, mask).numpy(), out, atol=1e-5)  # ...and what it holds is never read.
  # Position embeddings make the order matter: the same two items, swapped, encode differently.
  swapped = tf.gather(items, [1, 0, 2], axis=1)
  assert np.abs(encoder(swapped, mask).numpy()[0, 0] - out[0, 1]).max() > 1e-4


def test_query_tower_cuts_served_histories_to_max_history():
  config = dataclasses.replace(TINY_TOWER, sequence_encoder="self_attention", max_history=2)
  query_tower, _ = towers.build_towers(config)
  long = query_tower(_history_batch([["a1", "a2", "a3", "a4"]] * 2, [["c1", "c2", "c3", "c4"]] * 2, [["b"] * 4] * 2))
  cut = query_tower(_history_batch([["a1", "a2"]] * 2, [["c1", "c2"]] * 2, [["b"] * 2] * 2))
  np.testing.assert_allclose(long.numpy(), cut.numpy(), atol=1e-6)


def test_query_tower_without_user_id_ignores_it():
  query_tower, _ = towers.build_towers(dataclasses.replace(TINY_TOWER, use_user_id=False))
  batch = _query_batch([["ad1", "", ""], ["ad2", "", ""]], [["c1", "", ""], ["c2", "", ""]])
  other_users = {**batch, schema.USER_ID: tf.constant(["someone", "else"])}
  np.testing.assert_allclose(query_tower(batch).numpy(), query_tower(other_users).numpy(), atol=1e-6)


def test_din_attention_ignores_padding():
  layer = layers.MlpAttention((8,))
  rng = np.random.default_rng(0)
  target = tf.constant(rng.normal(size=[2, 4]).astype(np.float32))
  sequence = rng.normal(size=[2, 3, 4]).astype(np.float32)
  mask = tf.constant([[True, True, False], [False, False, False]])
  out = layer(target, tf.constant(sequence), mask).numpy()
  noisy = sequence.copy()
  noisy[~mask.numpy()] = 50.0
  np.testing.assert_allclose(layer(target, tf.constant(noisy), mask).numpy(), out, atol=1e-6)
  np.testing.assert_array_equal(out[1], np.zeros(4))


def test_id_only_baseline_towers_embed_ids_alone():
  query_tower, item_tower = towers.build_towers(dataclasses.replace(TINY_TOWER, features="ids_only"))
  out = query_tower(_query_batch([["ad1"], [""]], [["c1"], [""]]))
  assert out.shape == (2, TINY_TOWER.output_dim)
  # Only the user id matters to the query side.
  again = query_tower(_query_batch([["ad7"], ["ad3"]], [["c3"], ["c9"]]))
  np.testing.assert_allclose(out.numpy(), again.numpy())


def test_id_dropout_zeroes_ids_in_training_only():
  tf.keras.utils.set_random_seed(0)
  _, item_tower = towers.build_towers(dataclasses.replace(TINY_TOWER, id_dropout=0.5))
  n = 200
  batch = {
    schema.AD_ID: tf.constant([f"ad{i}" for i in range(n)]),
    schema.CATEGORY: tf.constant(["c1"] * n),
    schema.BRAND: tf.constant(["b1"] * n),
    schema.AD_TOKENS: tf.constant([["t1"]] * n),
  }
  serving = item_tower(batch).numpy()
  np.testing.assert_allclose(item_tower(batch, training=False).numpy(), serving)
  dropped = np.abs(item_tower(batch, training=True).numpy() - serving).max(axis=1) > 1e-6
  assert 0.35 < dropped.mean() < 0.65
  # A dropped row is the ad as the tower sees it with a zero id embedding: every dropped row is equal.
  training = item_tower(batch, training=True).numpy()
  changed = np.abs(training - serving).max(axis=1) > 1e-6
  np.testing.assert_allclose(training[changed], np.repeat(training[changed][:1], changed.sum(), axis=0), atol=1e-6)


def test_sequence_encoder_settings_are_checked():
  with pytest.raises(ValueError, match="needs sequence_encoder"):
    dataclasses.replace(TINY_TOWER, attention_target="query_and_latest")
  with pytest.raises(ValueError, match="must divide"):
    dataclasses.replace(TINY_TOWER, sequence_encoder="self_attention", sequence_heads=3)
