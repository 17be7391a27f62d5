"""The towers: shapes, normalisation, padding invariance and the restore path used by export."""

import dataclasses

import numpy as np
import tensorflow as tf

from models import towers, train
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
  batch = {schema.AD_ID: tf.constant(["ad-new-1", "ad-new-2"]), schema.CATEGORY: tf.constant(["c1", "c1"]),
           schema.BRAND: tf.constant(["b1", "b1"]), schema.AD_TOKENS: tf.constant([["t1", ""], ["t1", ""]])}
  out = item_tower(batch).numpy()
  assert out.shape == (2, TINY_TOWER.output_dim) and np.all(np.isfinite(out))


def test_mean_pooling_variant_builds():
  query_tower, _ = towers.build_towers(dataclasses.replace(TINY_TOWER, sequence_pooling="mean"))
  assert query_tower(_query_batch([["ad1"], [""]], [["c1"], [""]])).shape == (2, TINY_TOWER.output_dim)


def test_restore_reproduces_the_trained_towers(trained_run):
  model, run_config = train.restore(trained_run)
  assert run_config["tower"] == TINY_TOWER
  again, _ = train.restore(trained_run)
  batch = _query_batch([["ad1", "ad2", ""], ["", "", ""]], [["c1", "c2", ""], ["", "", ""]])
  np.testing.assert_allclose(model.query_tower(batch).numpy(), again.query_tower(batch).numpy())
