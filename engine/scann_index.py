"""ScaNN through its TensorFlow ops: tree partitioning, anisotropic hashing and exact reordering."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from engine import base, scann_config, scann_tuning, search_ops


def _scann_ops():
  # Imported lazily: loading ScaNN registers its custom ops, which only this backend may require.
  from scann.scann_ops.py import scann_ops  # pylint: disable=g-import-not-at-top

  return scann_ops


# Object paths below the index: ScaNN's state (`ScannAssetsModule`), and the float vectors of the exact
# fallback when they are not the state's dataset.
STATE = "state"
VECTORS = "vectors"
# The searcher's assets, in the order ScaNN's `scann_to_tensors` returns them.
ASSET_NAMES = (
  "scann_config",
  "serialized_partitioner",
  "datapoint_to_token",
  "ah_codebook",
  "hashed_dataset",
  "int8_dataset",
  "int8_multipliers",
  "dp_norms",
  "dataset",
)


class ScannAssetsModule(tf.Module):
  """The variables of ScaNN's `ScannState`, those with a row per datapoint saved with unknown rows.

  ScaNN's own module saves every asset with the shape it had at export (TF 2.20 keeps the initial
  value's shape despite its `validate_shape=False`), so a catalog of another size would need a new
  trace. The attribute names are ScannState's, so the checkpoint keys (`index/state/<asset>`) are too.
  """

  def __init__(self, state: Any):
    """`state`: a `ScannState`, or any object with the assets (variables or arrays) as attributes."""
    super().__init__(name="scann_state")
    for name in ASSET_NAMES:
      value = getattr(state, name)
      value = value.read_value() if isinstance(value, tf.Variable) else tf.convert_to_tensor(value)
      if value.shape.rank == 0:  # A placeholder for an asset the searcher does not use.
        # ScaNN leaves a numeric placeholder uninitialised: saved as is, it would make exports differ
        # byte for byte from build to build, and a NaN in it would compare unequal to itself.
        if value.dtype != tf.string:
          value = tf.zeros([], value.dtype)
        setattr(self, name, tf.Variable(value, trainable=False, name=name))
      else:
        setattr(self, name, base.catalog_variable(value, name=name))
    # Eagerly, TF keeps one kernel per op and attributes, and ScaNN's kernel keeps the first searcher it
    # made: without a name of this module's own, every index searched eagerly would answer from the first.
    self._eager_name = f"fgr-scann-{uuid.uuid4()}"

  def searcher(self) -> tf.Tensor:
    """ScaNN's searcher over these assets (a resource handle its search op takes)."""
    return _scann_ops().tensors_to_scann(
      self.dataset,
      self.scann_config,
      self.serialized_partitioner,
      self.datapoint_to_token,
      self.ah_codebook,
      self.hashed_dataset,
      self.int8_dataset,
      self.int8_multipliers,
      self.dp_norms,
      # Not in a graph: there a shared name would share one searcher between two loaded versions.
      shared_name=self._eager_name if tf.executing_eagerly() else "",
    )


class ScannIndex(base.Index):
  """A ScaNN searcher stored as variables inside the module, searched with ScaNN's TF ops.

  The searcher is built with ScaNN's builder and serialised with `serialize_to_module()` into a
  `ScannState` (a tf.Module of variables), so it is saved inside the SavedModel. At search time the
  `TensorsToScann` op turns those variables into a searcher handle; its kernel keeps the searcher
  it created, so a loaded model deserialises the index once, not per call (docs/history/benchmarks-2026-11.md, Index
  backends: what bounds ScaNN in the graph).

  ScaNN has no filter, so the search fetches the best `final_candidates` reordered candidates (2k by
  default) and drops ineligible ones. A query left short of k searches again with every reordered
  candidate, then, if still short, falls back to an exact masked search (each inside a `tf.cond`, run
  only when needed). A batch of one query runs ScaNN's single-query op, which is faster than a batch
  of one.

  Args:
    searcher: a built `scann_ops.ScannSearcher`.
    embeddings: float32 [N, d] item embeddings the searcher was built on.
    config: the resolved build configuration (see `build_scann`), kept for reports.
    eligible: optional bool [N] mask.
  """

  def __init__(
    self,
    searcher: Any,
    embeddings: np.ndarray,
    config: dict[str, Any],
    eligible: np.ndarray | None = None,
    name: str = "scann",
  ):
    super().__init__(embeddings.shape[0], eligible, name=name)
    self.config = dict(config)
    self.state = ScannAssetsModule(searcher.serialize_to_module())  # Saved at object path STATE.
    # Reordering keeps the float dataset inside the ScaNN state: reuse it for the exact fallback rather
    # than save the catalog twice. (Its static shape has unknown rows: compare the value's shape.)
    if tuple(tf.shape(self.state.dataset).numpy()) == embeddings.shape:
      self._vectors = self.state.dataset
    else:
      self.vectors = base.catalog_variable(embeddings, name="vectors")
      self._vectors = self.vectors

  def search(
    self,
    queries: tf.Tensor,
    k: int,
    leaves_to_search: tf.Tensor | None = None,
    pre_reorder_num_neighbors: tf.Tensor | None = None,
  ) -> base.SearchResult:
    """Approximate top-k eligible items; knobs of 0 (or omitted) use the built defaults.

    Per-request knobs out of range fail the request (InvalidArgument, naming the knob): leaves_to_search
    must be 1..num_leaves (0 without a tree, which ignores it), pre_reorder_num_neighbors k..num_items
    (0 without reordering).
    """
    scann_ops = _scann_ops()
    k = min(k, self.num_items)
    queries = tf.cast(queries, tf.float32)
    num_leaves = self.config["num_leaves"]
    if leaves_to_search is None:
      leaves = tf.constant(self.config["leaves_to_search"], tf.int32)
    elif num_leaves:
      leaves = search_ops.checked_option(
        leaves_to_search,
        self.config["leaves_to_search"],
        "leaves_to_search",
        1,
        num_leaves,
        f"0 (the built default, {self.config['leaves_to_search']}) or 1 to {num_leaves}, the number of leaves",
      )
    else:
      leaves = search_ops.checked_option(
        leaves_to_search, -1, "leaves_to_search", 1, 0, "0: this ScaNN index has no tree"
      )
    retry_all_reordered = False
    if self.config["reorder"] > 0:
      # ScaNN rescores `pre_reorder` candidates exactly and returns the best `fetch` of them, sorted, from
      # which ineligible ones are dropped (configs from before `final_candidates` returned them all).
      final_candidates = returned_candidates(self.config, k)
      retry_all_reordered = final_candidates < self.config["reorder"]
      if pre_reorder_num_neighbors is None:
        pre_reorder = tf.constant(max(self.config["reorder"], k), tf.int32)
        fetch = tf.constant(min(final_candidates, max(self.config["reorder"], k)), tf.int32)
      else:
        # The catalog size is read from the mask, not baked in: a refresh serves more rows under this graph.
        pre_reorder = tf.maximum(
          search_ops.checked_option(
            pre_reorder_num_neighbors,
            self.config["reorder"],
            "pre_reorder_num_neighbors",
            k,
            tf.shape(self.eligible)[0],
            f"0 (the built default, {self.config['reorder']}) or from k={k} to the number of ads",
          ),
          k,
        )
        fetch = tf.minimum(pre_reorder, final_candidates)
    else:
      fetch = tf.constant(min(self.num_items, k * self.config["overfetch"]), tf.int32)
      pre_reorder = tf.constant(-1, tf.int32)
      if pre_reorder_num_neighbors is not None:
        search_ops.checked_option(
          pre_reorder_num_neighbors, -1, "pre_reorder_num_neighbors", 1, 0, "0: this ScaNN index does not reorder"
        )
    handle = self.state.searcher()

    def candidates(count: tf.Tensor) -> base.SearchResult:
      """The k best eligible of ScaNN's best `count` reordered candidates (rows of -1 where short)."""

      def single() -> tuple[tf.Tensor, tf.Tensor]:
        # ScannSearch takes ScaNN's single-query path, which is faster than a batch of one.
        rows, scores = scann_ops.scann_search(handle, queries[0], count, pre_reorder, leaves)
        return rows[tf.newaxis], scores[tf.newaxis]

      def batched() -> tuple[tf.Tensor, tf.Tensor]:
        rows, scores = scann_ops.scann_search_batched(handle, queries, count, pre_reorder, leaves, True)
        # Queries with fewer results than others are padded with row -1 and a NaN score: make the slot
        # empty (-inf, which `base.finalize` turns into -1) and its row a safe one to gather from.
        return tf.maximum(rows, 0), tf.where(tf.math.is_nan(scores), tf.constant(-np.inf, tf.float32), scores)

      rows, scores = tf.cond(tf.equal(tf.shape(queries)[0], 1), single, batched)
      return self._eligible_top_k(rows, scores, k)

    def exact() -> base.SearchResult:
      return search_ops.exact_search(queries, self._vectors, self.eligible, k)

    if retry_all_reordered:
      # Short of k eligible among the best `fetch`: retry with every reordered candidate (another ScaNN
      # search, far cheaper than the exact scan) before the exact scan, so catalogs with many paused ads
      # stay fast.
      return search_ops.fill_short_rows(
        candidates(fetch), k, lambda: search_ops.fill_short_rows(candidates(pre_reorder), k, exact)
      )
    return search_ops.fill_short_rows(candidates(fetch), k, exact)

  def _eligible_top_k(self, rows: tf.Tensor, scores: tf.Tensor, k: int) -> base.SearchResult:
    """The k best eligible candidates of ScaNN's int32 rows (all ≥ 0) / float32 scores [B, F].

    Fewer ops than the generic `search_ops.top_k_of_candidates`, because every op is a noticeable share
    of a ScaNN search: ScaNN's dtypes are fixed, and empty slots were handled above.
    """
    scores = tf.where(tf.gather(tf.convert_to_tensor(self.eligible), rows), scores, tf.constant(-np.inf, tf.float32))
    pad = tf.maximum(k - tf.shape(scores)[1], 0)  # Fewer than k candidates: pad so top_k is defined.
    scores = tf.pad(scores, [[0, 0], [0, pad]], constant_values=-np.inf)
    rows = tf.pad(rows, [[0, 0], [0, pad]], constant_values=-1)
    top_scores, positions = tf.math.top_k(scores, k=k)
    return base.finalize(top_scores, tf.gather(rows, positions, batch_dims=1))

  def search_option_specs(self) -> dict[str, tf.TensorSpec]:
    return {
      "leaves_to_search": tf.TensorSpec([], tf.int32, name="leaves_to_search"),
      "pre_reorder_num_neighbors": tf.TensorSpec([], tf.int32, name="pre_reorder_num_neighbors"),
    }

  def save_namespaces(self) -> list[str]:
    return ["Scann"]

  def nbytes(self) -> int:
    # np.asarray: the serialised config is a scalar string variable, whose numpy() is plain bytes.
    return sum(
      int(np.asarray(v.numpy()).nbytes) for v in self.state.trainable_variables + self.state.non_trainable_variables
    )

  def checkpoint_values(self) -> dict[str, Any]:
    values = {base.ELIGIBLE: self.eligible, **{f"{STATE}/{name}": getattr(self.state, name) for name in ASSET_NAMES}}
    # Versions exported before the exact fallback reused ScaNN's float dataset saved a copy of it as
    # `vectors`, which their graphs read: give them the dataset there.
    values[VECTORS] = getattr(self, VECTORS, self.state.dataset)
    return values

  def optional_checkpoint_paths(self) -> frozenset[str]:
    return frozenset() if hasattr(self, VECTORS) else frozenset({VECTORS})

  def graph_reuse_blocker(self, saved_config: Mapping[str, Any], k: int, saved_num_items: int) -> str | None:
    # The serving functions read ScaNN's assets from variables and bake in k and the search knobs, and
    # num_leaves as the range search_with_options accepts for leaves_to_search.
    config = self.config
    baked = ["num_leaves", "leaves_to_search", "reorder"] + (["overfetch"] if config.get("reorder", 0) <= 0 else [])
    changed = [name for name in baked if config.get(name) != saved_config.get(name)]
    if config.get("reorder", 0) > 0 and returned_candidates(config, k) != returned_candidates(saved_config, k):
      changed.append("final_candidates")
    if changed:
      return f"search knobs {changed} differ from the saved graph's build"
    if config.get("reorder", 0) <= 0 and k * config["overfetch"] > min(self.num_items, saved_num_items):
      return "the candidate count depends on the catalog size"
    return None


def returned_candidates(config: dict[str, Any], k: int) -> int:
  """How many reordered candidates a reordering config has ScaNN return (all before `final_candidates`)."""
  return max(config.get("final_candidates") or config["reorder"], k)


def has_unit_norms(embeddings: np.ndarray, tolerance: float = 1e-3) -> bool:
  """Whether every row's L2 norm is within `tolerance` of 1 (checked in chunks, without a full copy)."""
  chunk = 1 << 16
  return all(
    np.all(np.abs(np.linalg.norm(embeddings[start : start + chunk], axis=1) - 1.0) <= tolerance)
    for start in range(0, embeddings.shape[0], chunk)
  )


def build_scann(
  embeddings: np.ndarray,
  *,
  k: int,
  eligible: np.ndarray | None = None,
  tuning_queries: np.ndarray | None = None,
  **options: Any,
) -> ScannIndex:
  """Builds a ScaNN index with defaults derived from N; every knob can be overridden by name.

  Args:
    embeddings: float32 [N, d] item embeddings.
    k: the default number of neighbours.
    eligible: optional bool [N] mask.
    tuning_queries: optional float32 [Q, d] queries used to tune `leaves_to_search`.
    **options: overrides of `scann_config.ScannConfig` fields (see there). A tree on a catalog below
      `scann_config.NO_TREE_MAX_ITEMS` (a test catalog) takes `num_leaves=…, scoring="ah"`.
  """
  num_items = embeddings.shape[0]
  base.check_k(k, num_items)  # Refused here, not deep in ScaNN's training or the knob tuning.
  scann_ops = _scann_ops()
  settings = scann_config.ScannConfig.for_catalog(num_items, k, **options)
  if settings.partitioning == "auto" and settings.num_leaves:
    settings.partitioning = "spherical" if has_unit_norms(embeddings) else "generic"
  config = settings.to_dict()  # What the index reports, with the results of training and tuning added.

  start = time.perf_counter()
  builder = scann_ops.builder(embeddings, k, "dot_product").set_n_training_threads(settings.training_threads)
  if settings.num_leaves:
    builder = builder.tree(
      num_leaves=settings.num_leaves,
      num_leaves_to_search=max(1, settings.leaves_to_search),
      training_sample_size=settings.training_sample_size,
      spherical=settings.partitioning == "spherical",
      # k-means++ seeding instead of random centers: the same catalog builds the same tree, so
      # exporting a checkpoint twice serves the same answers (recall alike, a longer build:
      # docs/performance.md).
      random_init=False,
    )
  if settings.scoring == "ah":
    builder = builder.score_ah(
      settings.dimensions_per_block,
      anisotropic_quantization_threshold=settings.anisotropic_quantization_threshold,
      training_sample_size=settings.training_sample_size,
    )
  else:
    builder = builder.score_brute_force()
  if settings.reorder:
    builder = builder.reorder(settings.reorder)
  searcher = builder.build()
  config["train_seconds"] = time.perf_counter() - start

  if settings.num_leaves and settings.leaves_to_search <= 0:
    if "reorder" in options or not settings.reorder:
      reorder_choices = [settings.reorder]
    else:  # Tune the reorder size too: 2k to 8k candidates.
      reorder_choices = sorted({min(num_items, m * k) for m in (2, 4, 5, 6, 8)})
    config.update(scann_tuning.tune_search_knobs(searcher, embeddings, settings, k, reorder_choices, tuning_queries))
    logging.info(
      "ScaNN: tuned leaves_to_search=%d of %d, reorder=%d (recall@%d %.3f on tuning queries)",
      config["leaves_to_search"],
      config["num_leaves"],
      config["reorder"],
      k,
      config["tuned_recall"],
    )
  elif not config["num_leaves"]:
    config["leaves_to_search"] = -1  # No tree: ScaNN ignores the knob.
  if config["reorder"] and not config["final_candidates"]:
    config["final_candidates"] = min(config["reorder"], 2 * k)
  config["build_seconds"] = time.perf_counter() - start
  return ScannIndex(searcher, embeddings, config, eligible)
