"""Several recall channels in one graph: each searched in its own index, merged without quotas, re-ranked.

Search-ads recall runs a semantic channel (relevance to the query) and an efficiency channel
(value), and ranks the union of their candidates as one list, not "n from A and m from B". In this
graph, one call:

1. encodes the query with each channel's query tower and searches that channel's index to its depth
   (paused ads are masked in every index);
2. scores every candidate in *every* channel (each channel keeps its items' embeddings, so an ad
   found by one channel is still judged by the others) and turns each channel's score into a click
   probability with the logistic calibration fit at export;
3. ranks the deduplicated union by one score, the weighted log-linear pool of those probabilities
   (sum over channels of weight * log p), after dropping candidates whose relevance (the relevance
   channel's calibrated probability of being on the query's topic) is below a minimum;
4. optionally re-ranks for diversity (`engine.diversity`: SSD or DPP over the relevance channel's
   item embeddings). Steps 2-4 run as one XLA cluster: stock TF Serving needs
   --xla_cpu_compilation_enabled for it (fgr-serve runs it as is).

Channel weights, depths, the minimum relevance and the diversity method and knobs are per-request
inputs of `search_with_options`; `serving_default` uses the defaults fixed at export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from engine import base, diversity, full_graph, knob_rules

# Object paths of the catalog in a saved ChannelGraph.
CHANNELS = "channels"
EMBEDDINGS = "embeddings"

# search_with_options inputs.
CHANNEL_WEIGHTS = "channel_weights"
CHANNEL_DEPTHS = "channel_depths"
MIN_RELEVANCE = "min_relevance"
DIVERSITY = "diversity"
DIVERSITY_WINDOW = "diversity_window"
SSD_GAMMA = "ssd_gamma"
DPP_THETA = "dpp_theta"
DIVERSITY_METHODS = diversity.METHODS

# Each candidate's source channels travel as one bit each, and the `channels` output is looked up in
# a table of all 2^C labels.
MAX_CHANNELS = 8


@dataclasses.dataclass(frozen=True)
class Calibration:
  """A logistic map from a channel's raw score s to a probability: sigmoid(slope * s + intercept)."""

  slope: float
  intercept: float

  def to_json(self) -> dict[str, float]:
    return {"slope": self.slope, "intercept": self.intercept}


def fit_calibration(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> Calibration:
  """Fits sigmoid(slope * s + intercept) to binary labels by Newton's method (weighted logistic regression).

  Two parameters by IRLS in NumPy: no dependency is worth adding for it. A tiny L2 penalty keeps the
  fit finite when the labels separate perfectly, and each Newton step is halved until the penalized
  loss does not rise: a full step from the start can overshoot on (nearly) separable labels, and
  undamped Newton then oscillates off to slopes of 1e7 and more.
  """
  s = np.asarray(scores, dtype=np.float64)
  y = np.asarray(labels, dtype=np.float64)
  w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
  if s.size == 0 or y.min() == y.max():
    raise ValueError("calibration needs both positive and negative examples")
  x = np.stack([s, np.ones_like(s)], axis=1)

  def loss(theta: np.ndarray) -> float:
    z = x @ theta
    return float(w @ (np.logaddexp(0.0, z) - y * z) + 5e-7 * theta @ theta)

  theta = np.array([1.0, float(np.log(np.average(y, weights=w) / (1 - np.average(y, weights=w))))])
  current = loss(theta)
  for _ in range(50):
    p = 1.0 / (1.0 + np.exp(-(x @ theta)))
    gradient = x.T @ (w * (p - y)) + 1e-6 * theta
    hessian = (x * (w * p * (1 - p))[:, None]).T @ x + 1e-6 * np.eye(2)
    step = np.linalg.solve(hessian, gradient)
    for _ in range(30):
      if loss(theta - step) <= current:
        break
      step = step / 2
    theta -= step
    current = loss(theta)
    if np.abs(step).max() < 1e-9:
      break
  return Calibration(slope=float(theta[0]), intercept=float(theta[1]))


@dataclasses.dataclass(frozen=True)
class Defaults:
  """The knobs `serving_default` uses, and `search_with_options` takes per request.

  Attributes:
    weights: each channel's weight in the pooled score.
    depths: candidates each channel contributes (at most its index's depth).
    min_relevance: candidates whose relevance probability is below it are dropped (0: keep all).
    diversity: "none", "ssd" or "dpp".
    window: SSD's sliding window (and DPP's, see `engine.diversity`).
    gamma: SSD's diversity trade-off.
    theta: DPP's relevance/diversity trade-off.
  """

  weights: tuple[float, ...]
  depths: tuple[int, ...]
  min_relevance: float = 0.0
  diversity: str = "none"
  window: int = 10
  # +29% ILAD@50 for 2.3% of click coverage on synthetic search ads (docs/performance.md, "Recall channels").
  gamma: float = 8.0
  theta: float = 0.5

  def __post_init__(self):
    if self.diversity not in DIVERSITY_METHODS:
      raise ValueError(f"diversity must be one of {DIVERSITY_METHODS}, got {self.diversity!r}")
    if len(self.weights) != len(self.depths):
      raise ValueError("one weight and one depth per channel")
    knob_rules.check(self.to_json())  # The rules each request's knobs are held to (`ChannelGraph`).

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def check_k(k: int, depths: list[int]) -> None:
  """Refuses a k that the channels, each searched `depths[c]` deep, cannot fill together."""
  if not 0 < k <= sum(depths):
    raise ValueError(
      f"k must be in [1, {sum(depths)}] (the sum of the channels' depths {list(depths)}), got {k}: lower k or "
      "search the channels deeper (fgr-export --channel_depth)"
    )


def embedding_output(channel: str) -> str:
  """The output of the encode signatures that holds channel `channel`'s embeddings."""
  return f"{EMBEDDINGS}_{channel}"


# The search_with_options input of each of `Defaults`' fields (each a knob of `engine.knob_rules`).
_INPUTS = {
  "weights": CHANNEL_WEIGHTS,
  "depths": CHANNEL_DEPTHS,
  "min_relevance": MIN_RELEVANCE,
  "diversity": DIVERSITY,
  "window": DIVERSITY_WINDOW,
  "gamma": SSD_GAMMA,
  "theta": DPP_THETA,
}


def option_inputs(knobs: Mapping[str, Any]) -> dict[str, tf.Tensor]:
  """`search_with_options`' knob inputs from knob values named as `Defaults`' fields (its `to_json`)."""
  return {
    CHANNEL_WEIGHTS: tf.constant(knobs["weights"], tf.float32),
    CHANNEL_DEPTHS: tf.constant(knobs["depths"], tf.int32),
    MIN_RELEVANCE: tf.constant(knobs["min_relevance"], tf.float32),
    DIVERSITY: tf.constant(knobs["diversity"]),
    DIVERSITY_WINDOW: tf.constant(knobs["window"], tf.int32),
    SSD_GAMMA: tf.constant(knobs["gamma"], tf.float32),
    DPP_THETA: tf.constant(knobs["theta"], tf.float32),
  }


class Channel(tf.Module):
  """One channel of the graph: its towers, its index, its items' embeddings and its calibration.

  Args:
    name: the channel's name ("semantic", "efficiency").
    query_tower, item_tower: the channel's towers.
    index: the channel's index over `embeddings`, built for a depth of `depth`.
    embeddings: float32 [N, d] item embeddings of the shared catalog, row i being item i.
    depth: the most candidates a request may ask of this channel (the index's k).
    click: calibration of the channel's score into a click probability.
    relevance: for the relevance channel, calibration of its score into the probability that the
      item is on the query's topic; None for the others.
  """

  def __init__(
    self,
    name: str,
    query_tower: full_graph.Tower,
    item_tower: full_graph.Tower,
    index: base.Index,
    embeddings: np.ndarray,
    depth: int,
    click: Calibration,
    relevance: Calibration | None = None,
  ):
    super().__init__(name=f"channel_{name}")
    if len(embeddings) != index.num_items:
      raise ValueError(f"channel {name}: {len(embeddings)} embeddings for an index of {index.num_items} items")
    if not 0 < depth <= index.num_items:
      raise ValueError(f"channel {name}: depth must be in [1, {index.num_items}], got {depth}")
    self.channel_name = name
    self.query_tower = query_tower
    self.item_tower = item_tower
    self.index = index
    self.embeddings = base.catalog_variable(np.asarray(embeddings, dtype=np.float32), name=EMBEDDINGS)
    self.depth = depth
    self.click = click
    self.relevance = relevance

  def probability(self, scores: tf.Tensor, calibration: Calibration) -> tf.Tensor:
    return tf.sigmoid(calibration.slope * scores + calibration.intercept)


class ChannelGraph(tf.Module):
  """The full graph with several channels: one call recalls, merges and re-ranks (see module docstring).

  Args:
    channels: the channels, over one shared catalog.
    item_ids: string [N] ids of the catalog rows.
    k: how many candidates a request returns.
    defaults: the knobs of `serving_default`.
    query_specs, item_specs: TensorSpecs of the query and item features (the signature inputs).
    exclusions: a string query feature [B, L] of item ids a request must not get back (e.g. its
      history); they are dropped from every channel's candidates before the merge. None keeps all.
  """

  def __init__(
    self,
    channels: list[Channel],
    item_ids: np.ndarray,
    k: int,
    defaults: Defaults,
    query_specs: dict[str, tf.TensorSpec],
    item_specs: dict[str, tf.TensorSpec],
    exclusions: str | None = None,
  ):
    super().__init__(name="channel_graph")
    full_graph.check_exclusions(exclusions, 0, query_specs)
    if not 0 < len(channels) <= MAX_CHANNELS:
      raise ValueError(f"a channel graph needs 1 to {MAX_CHANNELS} channels, got {len(channels)}")
    names = [channel.channel_name for channel in channels]
    if len(set(names)) != len(names):
      raise ValueError(f"channel names repeat: {names}")
    for channel in channels:
      if channel.index.num_items != len(item_ids):
        raise ValueError(f"channel {channel.channel_name} indexes {channel.index.num_items} items, not {len(item_ids)}")
    if len(defaults.weights) != len(channels):
      raise ValueError(f"{len(defaults.weights)} default weights for {len(channels)} channels")
    exported = [channel.depth for channel in channels]
    knob_rules.check({"depths": defaults.depths}, [knob_rules.depth_cap(exported)])
    check_k(k, exported)
    relevance = [i for i, channel in enumerate(channels) if channel.relevance is not None]
    if len(relevance) > 1:
      raise ValueError("at most one channel can judge relevance")
    self.channels = channels
    self.item_ids = base.catalog_variable(base.string_array(item_ids), name="item_ids")
    self.k = k
    self.defaults = defaults
    self.exclusions = exclusions
    self._relevance_channel = relevance[0] if relevance else None
    # Diversity is judged on the relevance channel's item embeddings (what the ads are about).
    self._diversity_channel = relevance[0] if relevance else 0
    self._query_specs = dict(query_specs)
    self._item_specs = dict(item_specs)

  @property
  def channel_names(self) -> list[str]:
    return [channel.channel_name for channel in self.channels]

  def _default_options(self) -> dict[str, tf.Tensor]:
    return option_inputs(self.defaults.to_json())

  def option_specs(self) -> dict[str, tf.TensorSpec]:
    num = len(self.channels)
    return {
      CHANNEL_WEIGHTS: tf.TensorSpec([num], tf.float32, name=CHANNEL_WEIGHTS),
      CHANNEL_DEPTHS: tf.TensorSpec([num], tf.int32, name=CHANNEL_DEPTHS),
      MIN_RELEVANCE: tf.TensorSpec([], tf.float32, name=MIN_RELEVANCE),
      DIVERSITY: tf.TensorSpec([], tf.string, name=DIVERSITY),
      DIVERSITY_WINDOW: tf.TensorSpec([], tf.int32, name=DIVERSITY_WINDOW),
      SSD_GAMMA: tf.TensorSpec([], tf.float32, name=SSD_GAMMA),
      DPP_THETA: tf.TensorSpec([], tf.float32, name=DPP_THETA),
    }

  def _check_options(self, options: dict[str, tf.Tensor]) -> list[tf.Operation]:
    """The asserts of the channel knobs' rules (the diversity knobs are `diversity.checked_knobs`')."""
    rules = (*knob_rules.CHANNEL_RULES, knob_rules.depth_cap([channel.depth for channel in self.channels]))
    return [knob_rules.assertion(rule, options[_INPUTS[rule.knob]]) for rule in rules]

  def retrieve(self, features: dict[str, tf.Tensor], options: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Top-k ids [B, k] ("" past the candidates), pooled scores [B, k] and source channels [B, k]."""
    with tf.control_dependencies(self._check_options(options)):
      weights = tf.identity(options[CHANNEL_WEIGHTS])
    method = diversity.method_index(options[DIVERSITY])
    window, gamma, theta = diversity.checked_knobs(
      method, options[DIVERSITY_WINDOW], options[SSD_GAMMA], options[DPP_THETA]
    )
    features = full_graph.checked_batch({name: features[name] for name in self._query_specs})
    queries = [channel.query_tower(features) for channel in self.channels]

    # 1. Each channel's candidates, cut to the request's depth.
    rows = []
    for c, (channel, query) in enumerate(zip(self.channels, queries)):
      result = channel.index.search(query, channel.depth)
      in_depth = tf.range(channel.depth)[tf.newaxis, :] < options[CHANNEL_DEPTHS][c]
      rows.append(tf.where(in_depth, result.indices, -1))
    rows = tf.concat(rows, axis=1)  # [B, M]
    if self.exclusions:  # An excluded candidate leaves as one past the request's depth does.
      candidate_ids = tf.gather(tf.convert_to_tensor(self.item_ids), tf.maximum(rows, 0))
      rows = tf.where(full_graph.excluded(candidate_ids, features[self.exclusions]), -1, rows)

    # 2-4. Everything numeric after the searches, in one XLA cluster: it is tens of small ops, whose
    # per-op cost as a plain graph was most of the merge (docs/performance.md, "Recall channels").
    # The candidates' embeddings are gathered here, outside XLA: a variable read inside the cluster
    # would copy every channel's whole [N, d] table into it on each call.
    safe_rows = tf.maximum(rows, 0)
    # From the read value (GatherV2): a gather from the variable itself (ResourceGather) locks it and
    # measured slower per request (see `base.mask_ineligible`).
    candidates = tuple(tf.gather(tf.convert_to_tensor(channel.embeddings), safe_rows) for channel in self.channels)
    out_rows, scores, masks = self._merge(
      rows, tuple(queries), candidates, weights, options[MIN_RELEVANCE], method, window, gamma, theta
    )
    picked = out_rows >= 0
    item_ids = tf.gather(tf.convert_to_tensor(self.item_ids), tf.maximum(out_rows, 0))
    ids = tf.where(picked, item_ids, tf.constant(b"", tf.string))
    # One gather from every label a channel bit mask can have: building each label with string ops per
    # request (a join and a select per channel) cost more than the whole merge.
    labels = tf.where(picked, tf.gather(self._source_labels(), masks), tf.constant(b""))
    return {"ids": ids, "scores": scores, "channels": labels}

  def _source_labels(self) -> tf.Tensor:
    """String [2^C]: entry m names the channels whose bits m sets, joined by "+" in channel order."""
    names = self.channel_names
    return tf.constant(["+".join(n for c, n in enumerate(names) if mask >> c & 1) for mask in range(1 << len(names))])

  @tf.function(jit_compile=True, autograph=False)
  def _merge(
    self,
    rows: tf.Tensor,
    queries: tuple[tf.Tensor, ...],
    candidates: tuple[tf.Tensor, ...],
    weights: tf.Tensor,
    min_relevance: tf.Tensor,
    method: tf.Tensor,
    window: tf.Tensor,
    gamma: tf.Tensor,
    theta: tf.Tensor,
  ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Dedup, score in every channel, pool, filter and rank the candidate rows [B, M], then pick k of them.

    `candidates` holds each channel's embeddings [B, M, d] of those rows.

    Returns:
      The k picks in order: catalog rows [B, k] (-1 past the candidates), pooled scores [B, k] (-inf
      there) and the bit mask of the channels that found each [B, k].
    """
    num = rows.shape[1]
    sources = np.concatenate([np.full([channel.depth], c, np.int32) for c, channel in enumerate(self.channels)])
    valid = rows >= 0
    # 2. Deduplicate: keep a row's first occurrence; remember every channel that found it.
    same = tf.logical_and(tf.equal(rows[:, :, tf.newaxis], rows[:, tf.newaxis, :]), valid[:, tf.newaxis, :])
    earlier = np.tril(np.ones([num, num], bool), -1)  # [i, j]: j comes before i.
    valid = valid & ~tf.reduce_any(same & earlier[np.newaxis], axis=2)
    bits = tf.constant(np.left_shift(1, sources)[np.newaxis, np.newaxis, :])
    found_by = tf.reduce_sum(tf.where(same, bits, 0), axis=2)

    # 3. Every channel's calibrated probability of every candidate, pooled log-linearly. The weights
    # are scaled to a largest of 1 first: the weighted mean is the same, and huge finite weights
    # (3e38) no longer overflow their sum to inf, whose inf / inf = NaN would drop every candidate.
    weights = weights / tf.reduce_max(weights)
    pooled = tf.zeros(tf.shape(rows), tf.float32)
    for c, (channel, query, embeddings) in enumerate(zip(self.channels, queries, candidates)):
      scores = tf.reduce_sum(query[:, tf.newaxis, :] * embeddings, axis=-1)
      pooled += weights[c] * tf.math.log_sigmoid(channel.click.slope * scores + channel.click.intercept)
      if c == self._relevance_channel:
        valid = valid & (channel.probability(scores, channel.relevance) >= min_relevance)
    pooled /= tf.reduce_sum(weights)

    # 4. The final list: by pooled score, or re-ranked for diversity. The re-rankers see the pooled
    # log-probability relative to the request's best candidate, so their knobs mean the same for every
    # request: SSD's gamma is the log-probability a unit of novelty is worth, DPP's quality is p^alpha.
    best = tf.reduce_max(tf.where(valid, pooled, -np.inf), axis=1, keepdims=True)
    relative = tf.where(valid, pooled - tf.where(tf.math.is_finite(best), best, 0.0), 0.0)
    chosen = diversity.rerank_numeric(
      method, candidates[self._diversity_channel], relative, valid, self.k, window, gamma, theta
    )
    picked = chosen >= 0
    safe = tf.maximum(chosen, 0)
    out_rows = tf.where(picked, tf.gather(rows, safe, batch_dims=1), -1)
    scores = tf.where(picked, tf.gather(pooled, safe, batch_dims=1), -np.inf)
    return out_rows, scores, tf.gather(found_by, safe, batch_dims=1)

  def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
    """serving_default, search_with_options (the knobs), encode_query and encode_item (one output per channel)."""
    option_specs = self.option_specs()
    overlap = set(option_specs) & set(self._query_specs)
    if overlap:
      raise ValueError(f"Channel options {sorted(overlap)} clash with query feature names")

    @tf.function
    def serve(**features):
      return self.retrieve(features, self._default_options())

    @tf.function
    def search_with_options(**inputs):
      options = {name: inputs.pop(name) for name in option_specs}
      return self.retrieve(inputs, options)

    @tf.function
    def encode_query(**features):
      return {embedding_output(c.channel_name): c.query_tower(features) for c in self.channels}

    @tf.function
    def encode_item(**features):
      return {embedding_output(c.channel_name): c.item_tower(features) for c in self.channels}

    return {
      full_graph.SERVING_DEFAULT: serve.get_concrete_function(**self._query_specs),
      full_graph.SEARCH_WITH_OPTIONS: search_with_options.get_concrete_function(**self._query_specs, **option_specs),
      full_graph.ENCODE_QUERY: encode_query.get_concrete_function(**self._query_specs),
      full_graph.ENCODE_ITEM: encode_item.get_concrete_function(**self._item_specs),
    }

  def save(self, path: str) -> None:
    """Writes the SavedModel to path (which must not exist yet) with every signature."""
    namespaces = sorted({ns for channel in self.channels for ns in channel.index.save_namespaces()})
    options = tf.saved_model.SaveOptions(namespace_whitelist=namespaces or None)
    with full_graph.without_keras_layer_notices():
      tf.saved_model.save(self, path, signatures=self.signatures(), options=options)
