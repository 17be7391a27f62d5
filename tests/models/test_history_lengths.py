"""The query tower refuses behaviour history features of different lengths, naming each length."""

import dataclasses

import pytest
import tensorflow as tf

from models import towers
from models.data import schema
from tests.conftest import TINY_TOWER


def _request(hist_ids, hist_categories, hist_brands):
  return {
    schema.USER_ID: tf.constant(["u1"]),
    schema.USER_FEATURES: tf.constant([[""]]),
    schema.QUERY_TOKENS: tf.constant([["t3_1"]]),
    schema.HIST_IDS: tf.constant([hist_ids]),
    schema.HIST_CATEGORIES: tf.constant([hist_categories]),
    schema.HIST_BRANDS: tf.constant([hist_brands]),
  }


def _as_signature(query_tower):
  """The tower traced as a serving signature is: every dimension but the features' ranks unknown."""
  ranks = {name: len(tensor.shape) for name, tensor in _request([""], [""], [""]).items()}
  specs = {name: tf.TensorSpec([None] * rank, tf.string) for name, rank in ranks.items()}
  return tf.function(lambda **features: query_tower(features)).get_concrete_function(**specs)


@pytest.mark.parametrize(
  "categories", [["c3"], ["c3", "c3", "c3"]], ids=["one_category_was_broadcast", "longer_failed_in_an_op"]
)
def test_history_features_of_other_lengths_are_invalid_argument(categories):
  """One category beside two ids was read as both clicks' category and answered; 3 beside 2 failed in the
  tower with "Incompatible shapes", naming no feature."""
  query_tower, _ = towers.build_towers(TINY_TOWER)
  lengths = f"\\[2 {len(categories)} 2\\]"
  with pytest.raises(
    tf.errors.InvalidArgumentError,
    match=f"lengths \\(dimension 1\\) of hist_ids, hist_categories, hist_brands are.*{lengths}",
  ):
    _as_signature(query_tower)(**_request(["ad3", "ad53"], categories, ["b3_1", ""]))


def test_history_features_of_one_length_pass():
  query_tower, _ = towers.build_towers(TINY_TOWER)
  assert query_tower(_request(["ad3", "ad53"], ["c3", ""], ["", ""])).shape == (1, TINY_TOWER.output_dim)


def test_ids_may_run_past_the_side_info_only_where_they_are_pooled_apart():
  """Default towers pool ids apart from side info, so more ids than categories are clicks without side
  info (fgr-export --exclude_history requests name more ids to exclude); summed towers add them."""
  request = _request(["ad3", "ad53", "ad103"], ["c3", ""], ["", ""])
  query_tower, _ = towers.build_towers(TINY_TOWER)
  assert _as_signature(query_tower)(**request).shape == (1, TINY_TOWER.output_dim)
  summed, _ = towers.build_towers(dataclasses.replace(TINY_TOWER, side_info="summed"))
  with pytest.raises(
    tf.errors.InvalidArgumentError, match=r"hist_ids, hist_categories and hist_brands must.*\[3 2 2\]"
  ):
    _as_signature(summed)(**request)
