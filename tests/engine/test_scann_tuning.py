"""ScaNN's search-knob tuner: the fewest leaves that reach the target recall, not the next ladder step."""

import numpy as np
import tensorflow as tf

from engine import scann_config, scann_tuning, search_ops


class _CurveSearcher:
  """A searcher whose recall@k is a known function of leaves_to_search: it returns the exact top k for
  the first share of the queries and nothing for the rest."""

  def __init__(self, truth: np.ndarray, recall_of_leaves):
    self.truth = truth
    self.recall_of_leaves = recall_of_leaves
    self.searched = []

  def search_batched_parallel(self, queries, final_num_neighbors, pre_reorder_num_neighbors, leaves_to_search):
    self.searched.append(leaves_to_search)
    rows = np.full_like(self.truth, -1)
    answered = int(round(self.recall_of_leaves(leaves_to_search) * len(rows)))
    rows[:answered] = self.truth[:answered]
    return tf.constant(rows), None

  def search(self, query, final_num_neighbors, pre_reorder_num_neighbors, leaves_to_search):
    return None


def test_tuned_leaves_are_within_five_percent_of_the_fewest_that_reach_the_target():
  rng = np.random.default_rng(0)
  items = rng.normal(size=(2000, 16)).astype(np.float32)
  queries = rng.normal(size=(200, 16)).astype(np.float32)
  truth = search_ops.exact_top_k_tf(queries, items, 10)
  config = scann_config.ScannConfig(scoring="ah", num_leaves=1000, target_recall=0.95)
  # Recall grows linearly to 1 at 180 leaves: the target with its margin (0.965) needs 174; the
  # tuner's ladder has 150 and 200 on either side.
  searcher = _CurveSearcher(truth, lambda leaves: min(1.0, leaves / 180))
  tuned = scann_tuning.tune_search_knobs(searcher, items, config, 10, [40], queries)
  assert 174 <= tuned["leaves_to_search"] <= 174 + 174 // 20, tuned
  assert tuned["tuned_recall"] >= 0.965 and tuned["reorder"] == 40
  # Bisection costs a few batched searches, not one per leaf.
  assert len(searcher.searched) <= 20, searcher.searched
