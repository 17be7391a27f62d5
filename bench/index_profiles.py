"""fgr-bench's timing-only probes: where a single query's time goes (ScaNN's ops alone, per-call floors)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from engine import base


def tf_function_search(index: base.Index, k: int) -> Callable[[np.ndarray], np.ndarray]:
  """`Index.search` called eagerly through a concrete `tf.function` (a profile: not how serving runs it)."""

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)])
  def search(queries: tf.Tensor) -> tf.Tensor:
    return index.search(queries, k).indices

  concrete = search.get_concrete_function()
  return lambda queries: concrete(tf.constant(queries)).numpy()


class ScannOpOnly(base.Index):
  """ScaNN's own TF ops at the built defaults, without eligibility filtering or fallback (a profile)."""

  def __init__(self, index: base.Index):
    super().__init__(1, name="scann_op_only")
    self.scann = index

  def search(self, queries: tf.Tensor, k: int, **options: tf.Tensor) -> base.SearchResult:
    from scann.scann_ops.py import scann_ops  # pylint: disable=g-import-not-at-top

    from engine import scann_index  # pylint: disable=g-import-not-at-top

    state, config = self.scann.state, self.scann.config
    fetch = max(config["reorder"], k) if config["reorder"] else k
    final = min(fetch, scann_index.returned_candidates(config, k)) if config["reorder"] else k  # As the search.
    handle = state.searcher()
    rows, scores = scann_ops.scann_search(
      handle, queries[0], final, fetch if config["reorder"] else -1, config["leaves_to_search"]
    )
    return base.SearchResult(scores[tf.newaxis], rows[tf.newaxis])

  def save_namespaces(self) -> list[str]:
    return ["Scann"]


class Identity(base.Index):
  """Returns its input: the per-call floor of any in-graph backend on a given path (a profile)."""

  def __init__(self):
    super().__init__(1, name="identity")

  def search(self, queries: tf.Tensor, k: int, **options: tf.Tensor) -> base.SearchResult:
    return base.SearchResult(queries, tf.identity(queries))


def tf_call_floor() -> Callable[[np.ndarray], np.ndarray]:
  """A tf.function that only copies its input: the floor of an eager `tf.function` call."""
  identity = tf.function(tf.identity, input_signature=[tf.TensorSpec([None, None], tf.float32)])
  concrete = identity.get_concrete_function()
  return lambda queries: concrete(tf.constant(queries)).numpy()
