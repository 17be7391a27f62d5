"""Diversity re-ranking of a request's candidates in TF ops: SSD and greedy DPP, chosen per request.

A retrieval list ranked by score alone repeats near-duplicates. These re-rankers run inside the
serving graph on the merged candidates of each request, so one SavedModel call returns a diverse
list, with the method and its knobs taken per request from the signature's inputs.

Both methods share one greedy loop. With v_i the L2-normalised embeddings, each step measures every
candidate's residual r_i = ||v_i orthogonal to span(v of the last `window` picks)||, then
  SSD (Huang et al., KDD 2021): picks argmax score_i + gamma * r_i;
  DPP (Chen, Zhang, Zhou, NeurIPS 2018): picks argmax 2 alpha score_i + log r_i^2, alpha = theta / (2 (1 - theta)).
For the DPP kernel L = diag(q) S diag(q) with the cosine similarity S = V V^T and q_i = exp(alpha score_i),
r_i^2 is the Schur complement d_i^2 of Chen et al.'s incremental Cholesky divided by q_i^2, so the
DPP step is their fast greedy MAP step, computed in the log domain (q itself overflows float32 for
large alpha * score). S = V V^T is a Gram matrix, hence PSD as is; (1 + S) / 2 is not used, as it
makes orthogonal items look half-similar and weakens the diversity the kernel is there for.

Call `rerank(..., jit_compile=True)` when serving: the string dispatch and knob checks stay in the
plain graph and each method's loop is one XLA cluster, ~1 ms over the top-k for n = 400, d = 64,
k = 50 on CPU, against ~17 ms as a plain graph (python -m bench.diversity_latency).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from engine import knob_rules

METHODS = ("none", "ssd", "dpp")

# DPP stops (pads -1) once the best remaining residual^2 falls below this: the marginal log-det
# gain is then numerically -inf (float32 rounding of the tracked residuals is ~1e-6).
_MIN_DPP_RESIDUAL2 = 1e-4
# A pick whose residual norm is below this adds no direction to the window's span (a duplicate), and
# an inactive pick relying less than this on a leaving one does not replace it.
_MIN_BASIS_NORM = 1e-3


def _normalise(embeddings: tf.Tensor) -> tf.Tensor:
  """Rows scaled to unit L2 norm; all-zero rows stay zero (they have no direction to diversify)."""
  return tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1, epsilon=1e-12)


def _dot_matmul(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  """Row-wise dot products of a [B, m, d] with b [B, d]: [B, m], as a batched matvec (for XLA)."""
  return tf.einsum("bmd,bd->bm", a, b)


def _pair_matmul(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  """Dot products of matching rows of a and b [B, d]: [B], as a batched dot (for XLA).

  XLA:CPU splits a float reduction into two kernels (a windowed partial sum, then the sum), and fuses
  a small dot into the kernel that makes its operands: written as dots, the loop's norms and sums cost
  fewer kernels per step, and each kernel launch is most of a step's time at these sizes.
  """
  return tf.einsum("bd,bd->b", a, b)


def _pair_sum(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  """The same as a multiply and a sum (for a plain graph, as `_dot_sum`)."""
  return tf.reduce_sum(a * b, axis=-1)


def _dot_sum(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  """The same as a multiply and a sum (for a plain graph).

  In a plain graph TF's BatchMatMul costs ~60 us a call at these sizes, and the loop makes ~10 such
  calls per step: a multiply and a sum ran the whole loop 2-4x faster at batch 1. Under XLA the
  matvec form measured up to 2x faster at batch 32 (its dot emitter beats the fused reduction).
  """
  return tf.reduce_sum(a * b[:, tf.newaxis, :], axis=-1)


def _greedy(
  embeddings: tf.Tensor,
  scores: tf.Tensor,
  valid: tf.Tensor,
  k: int,
  window: tf.Tensor,
  gain: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
  min_residual2: float | None,
  for_xla: bool,
) -> tf.Tensor:
  """The greedy loop both methods share; returns int32 [B, k] positions, -1 when nothing is left.

  Args:
    embeddings: float [B, n, d] candidate embeddings (normalised here).
    scores: float [B, n].
    valid: bool [B, n]; False candidates (and -inf or NaN scores) are never picked.
    k: static number of picks.
    window: int32 scalar; residuals are taken against the span of the last `window` picks.
    gain: (scores, residual2) -> float [B, n] objective of each candidate at this step.
    min_residual2: candidates whose residual^2 is at or below this are never picked (DPP's log-det gain
      is numerically -inf there); None for SSD, which still ranks a duplicate by its score.
    for_xla: whether the loop will be XLA-compiled, which picks the faster form of the dot products.

  Every candidate's residual^2 is kept up to date with one O(n d) product per change of the window's
  span, and the span is tracked by the dual basis of the window's picks: vectors D_j in the span with
  D_j . p_l = delta_jl (D = G^-1 W for the window's Gram matrix G). Both ends of the window then
  cost O(k d), with no factorisation and no loop over the window inside a step:
    adding pick p: its direction r = p - W^T D p is orthogonal to the span, residual^2 -= (V r/|r|)^2;
      this is Chen et al.'s incremental Cholesky in vector form (their Cholesky row of candidate i is
      v_i's coordinates along the normalised r's), keeping [k, d] vectors, not their [n, k] rows;
    dropping the oldest pick a: u = D_a / |D_a| is the one direction of the span orthogonal to the
      other picks, so residual^2 += (V u)^2 and the other duals lose their u component.
  A pick inside the span (|r| ~ 0, a duplicate, which SSD may choose) adds no direction and stays
  inactive; if an active pick leaves while an inactive one still depends on it, the inactive one takes
  its place (a pivot, as in the simplex method) and the span does not change. Rebuilding the window's
  basis each step instead (a Cholesky of its Gram matrix, then projecting all n candidates) measured
  ~26 ms per request for n = 400, k = 50, window = 10 under XLA, against ~1-2 ms for this.
  The buffers are [B, k, ...], static in k, so XLA can compile the loop.
  """
  # One invalid candidate appended after the n, so argmax has a column even when n = 0; it is never
  # picked, so positions stay positions into n. Scores of -inf or NaN are never picked either (with
  # an -inf gain, argmax could not tell them from the masked candidates).
  v = tf.pad(_normalise(embeddings), [[0, 0], [0, 1], [0, 0]])  # [B, n + 1, d]
  scores = tf.pad(tf.cast(scores, tf.float32), [[0, 0], [0, 1]])
  valid = tf.pad(tf.cast(valid, tf.bool), [[0, 0], [0, 1]], constant_values=False)
  valid = tf.logical_and(valid, scores > -np.inf)
  window = tf.cast(tf.reshape(window, []), tf.int32)
  batch, dim = tf.shape(v)[0], tf.shape(v)[2]
  positions = tf.zeros_like(valid, tf.int32) + tf.range(tf.shape(v)[1])  # [B, n + 1], static like `valid`.
  norm2 = tf.reduce_sum(tf.square(v), axis=-1)  # [B, n + 1]: 1, or 0 for an all-zero embedding.
  slots = tf.range(k)
  _dot = _dot_matmul if for_xla else _dot_sum
  _pair_dot = _pair_matmul if for_xla else _pair_sum

  def step(t, picks, picked, duals, active, residual2, available):
    objective = gain(scores, residual2)
    allowed = available if min_residual2 is None else tf.logical_and(available, residual2 > min_residual2)
    objective = tf.where(allowed, objective, tf.constant(-np.inf, tf.float32))
    best = tf.argmax(objective, axis=1, output_type=tf.int32)  # [B]
    # Allowed candidates have an objective above -inf, so the best one's value says whether any was
    # allowed: one read of the argmax instead of another reduction (each is its own XLA kernel).
    found = tf.gather(objective, best, batch_dims=1) > -np.inf  # [B]
    chosen = tf.logical_and(tf.equal(positions, best[:, tf.newaxis]), found[:, tf.newaxis])
    # A row that finds nothing stops for good: for DPP, a later step would slide the window past a pick
    # that was never made and pick again after the -1, leaving a hole mid-list instead of padding.
    available = tf.logical_and(tf.logical_and(available, tf.logical_not(chosen)), found[:, tf.newaxis])
    at_t = tf.equal(slots, t)[tf.newaxis, :]  # [1, k]
    picks = tf.where(at_t, tf.where(found, best, -1)[:, tf.newaxis], picks)
    pick = tf.gather(v, best, batch_dims=1) * tf.cast(found, tf.float32)[:, tf.newaxis]  # [B, d]
    picked = tf.where(at_t[..., tf.newaxis], pick[:, tf.newaxis, :], picked)

    def drop_oldest() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
      dual = tf.gather(duals, t - window, axis=1)  # [B, d]
      length = tf.sqrt(_pair_dot(dual, dual))[:, tf.newaxis]
      u = dual / tf.maximum(length, 1e-12)  # Zero if the oldest pick was inactive: nothing changes.
      others = tf.logical_and(slots > t - window, slots < t)[tf.newaxis, :]  # Still in the window.
      # An inactive pick of the window that depends on the oldest one takes its place.
      reliance = tf.where(tf.logical_and(others, tf.logical_not(active)), tf.abs(_dot(picked, u)), 0.0)
      heir = tf.argmax(reliance, axis=1, output_type=tf.int32)
      pivot = tf.gather(reliance, heir, batch_dims=1) > _MIN_BASIS_NORM  # [B]
      heir_vector = tf.gather(picked, heir, batch_dims=1)
      heir_dual = dual / tf.where(pivot, _pair_dot(dual, heir_vector), 1.0)[:, tf.newaxis]
      pivoted = duals - _dot(duals, heir_vector)[..., tf.newaxis] * heir_dual[:, tf.newaxis, :]
      is_heir = tf.equal(slots[tf.newaxis, :], heir[:, tf.newaxis])  # [B, k]
      pivoted = tf.where(is_heir[..., tf.newaxis], heir_dual[:, tf.newaxis, :], pivoted)
      # Otherwise u leaves the span: the other duals lose their u component, residuals gain it back.
      shrunk = duals - _dot(duals, u)[..., tf.newaxis] * u[:, tf.newaxis, :]
      new_duals = tf.where(pivot[:, tf.newaxis, tf.newaxis], pivoted, shrunk)
      new_duals = tf.where(others[..., tf.newaxis], new_duals, 0.0)
      new_active = tf.logical_and(tf.logical_or(active, tf.logical_and(is_heir, pivot[:, tf.newaxis])), others)
      regained = tf.where(pivot[:, tf.newaxis], 0.0, tf.square(_dot(v, u)))
      return new_duals, new_active, residual2 + regained

    # Until `window` picks are in, the window only grows; from then on each pick pushes the oldest out.
    duals, active, residual2 = tf.cond(t >= window, drop_oldest, lambda: (duals, active, residual2))
    # The new pick's direction outside the span, projected out twice for float32 ("twice is enough").
    direction = pick
    for _ in range(2):
      direction -= tf.einsum("bk,bkd->bd", _dot(duals, direction), picked)
    length = tf.sqrt(_pair_dot(direction, direction))
    adds = length > _MIN_BASIS_NORM  # [B]
    own_dual = direction / tf.where(adds, _pair_dot(direction, pick), 1.0)[:, tf.newaxis]
    own_dual = tf.where(adds[:, tf.newaxis], own_dual, 0.0)
    duals -= _dot(duals, pick)[..., tf.newaxis] * own_dual[:, tf.newaxis, :]
    duals = tf.where(at_t[..., tf.newaxis], own_dual[:, tf.newaxis, :], duals)
    active = tf.logical_or(active, tf.logical_and(at_t, adds[:, tf.newaxis]))
    unit = direction / tf.maximum(length, 1e-12)[:, tf.newaxis] * tf.cast(adds, tf.float32)[:, tf.newaxis]
    residual2 = tf.clip_by_value(residual2 - tf.square(_dot(v, unit)), 0.0, norm2)
    return t + 1, picks, picked, duals, active, residual2, available

  state = (
    tf.constant(0),
    tf.fill([batch, k], -1),
    tf.zeros([batch, k, dim]),
    tf.zeros([batch, k, dim]),
    tf.zeros([batch, k], tf.bool),
    norm2,
    valid,
  )
  # A Python-unrolled loop of k steps measured slower at n = 400, k = 50 (plain graph 25 vs 18 ms,
  # XLA 5.9 vs 2.5 ms), and its graph grows with k.
  _, picks, *_ = tf.while_loop(lambda t, *_: t < k, step, state, maximum_iterations=k)
  return tf.ensure_shape(picks, [None, k])


def _ssd_numeric(embeddings, scores, valid, k, window, gamma, for_xla=False):
  gamma = tf.cast(tf.reshape(gamma, []), tf.float32)
  # A candidate in the window's span has residual 0; its tracked float32 value is rounding noise (~1e-7 to
  # 1e-5), which gamma would reward. Below the norm under which a pick adds no direction, it counts as 0.
  gain = lambda s, r2: s + gamma * tf.sqrt(tf.where(r2 > _MIN_BASIS_NORM**2, r2, 0.0))  # noqa: E731
  return _greedy(embeddings, scores, valid, k, window, gain, None, for_xla)


def _dpp_numeric(embeddings, scores, valid, k, theta, window, for_xla=False):
  theta = tf.cast(tf.reshape(theta, []), tf.float32)
  alpha = theta / (2.0 * (1.0 - theta))
  objective = lambda s, r2: 2.0 * alpha * s + tf.math.log(r2)  # noqa: E731
  return _greedy(embeddings, scores, valid, k, window, objective, _MIN_DPP_RESIDUAL2, for_xla)


# The same numerics compiled by XLA as one cluster per (k, shapes); knob checks stay outside, since
# XLA drops Assert ops.
_ssd_xla = tf.function(functools.partial(_ssd_numeric, for_xla=True), jit_compile=True, autograph=False)
_dpp_xla = tf.function(functools.partial(_dpp_numeric, for_xla=True), jit_compile=True, autograph=False)


def _checked(rule: knob_rules.Rule, value: tf.Tensor | float, method: tf.Tensor | None = None) -> tf.Tensor:
  """The scalar knob `value`, cast to its rule's type, once the rule holds (INVALID_ARGUMENT if not).

  With `method` (an index into METHODS), a request whose method does not use the knob is not checked on it.
  """
  value = tf.cast(tf.reshape(value, []), tf.dtypes.as_dtype(rule.dtype))
  skip = None
  if method is not None and rule.methods:  # A rule without methods holds for every request.
    skip = tf.reduce_all([tf.not_equal(method, METHODS.index(name)) for name in rule.methods])
  with tf.control_dependencies([knob_rules.assertion(rule, value, skip)]):
    return tf.identity(value)


def ssd(
  embeddings: tf.Tensor,
  scores: tf.Tensor,
  valid: tf.Tensor,
  k: int,
  window: tf.Tensor | int,
  gamma: tf.Tensor | float,
  jit_compile: bool = False,
) -> tf.Tensor:
  """Sliding Spectrum Decomposition, greedy: each step picks argmax score_i + gamma * residual_i.

  residual_i is the norm of the normalised v_i orthogonal to the span of the last `window` picks, so
  the first pick is the best score and gamma = 0 is the top-k by score.

  Args:
    embeddings: float32 [B, n, d], normalised here.
    scores: float32 [B, n], higher is better (any real; -inf or NaN: never picked).
    valid: bool [B, n]; False candidates (padding, filtered) are never picked.
    k: static number of picks (the output width).
    window: int32 scalar tensor >= 1; a window >= k never slides.
    gamma: float32 scalar tensor >= 0, the weight of diversity against score.
    jit_compile: run the loop as an XLA cluster (knob checks stay outside it).

  Returns:
    int32 [B, k]: positions into n in pick order; -1 once a row has no valid candidate left.
  """
  window, gamma = _checked(knob_rules.WINDOW, window), _checked(knob_rules.GAMMA, gamma)
  return (_ssd_xla if jit_compile else _ssd_numeric)(embeddings, scores, valid, k, window, gamma)


def dpp(
  embeddings: tf.Tensor,
  scores: tf.Tensor,
  valid: tf.Tensor,
  k: int,
  theta: tf.Tensor | float,
  window: tf.Tensor | int | None = None,
  jit_compile: bool = False,
) -> tf.Tensor:
  """Fast greedy MAP of a DPP with kernel diag(q) S diag(q): each step maximises the log det gain.

  S is the cosine similarity of the embeddings and q_i = exp(alpha * score_i) with
  alpha = theta / (2 (1 - theta)), Chen et al.'s relevance/diversity trade-off: theta = 0 is pure
  diversity (ties, such as the first pick, go to the lowest position), theta -> 1 approaches top-k.
  `window` is their sliding window (section 4.2): the log det is taken over the last `window` picks
  and the candidate. A row stops early (-1) once no candidate adds a numerically non-zero residual,
  so with window >= d at most d (the rank of S) items are picked.

  Args:
    embeddings: float32 [B, n, d], normalised here.
    scores: float32 [B, n], higher is better (any real; -inf or NaN: never picked).
    valid: bool [B, n]; False candidates are never picked.
    k: static number of picks.
    theta: float32 scalar tensor in [0, 1).
    window: int32 scalar tensor >= 1; None, or a window >= k, is the plain (windowless) greedy DPP.
    jit_compile: run the loop as an XLA cluster (knob checks stay outside it).

  Returns:
    int32 [B, k]: positions into n in pick order, -1 after the last pick.
  """
  theta, window = _checked(knob_rules.THETA, theta), _checked(knob_rules.WINDOW, k if window is None else window)
  return (_dpp_xla if jit_compile else _dpp_numeric)(embeddings, scores, valid, k, theta, window)


def top_k(scores: tf.Tensor, valid: tf.Tensor, k: int) -> tf.Tensor:
  """The k best valid positions by score, int32 [B, k], -1 where fewer than k are valid (-inf/NaN are not)."""
  scores = tf.cast(scores, tf.float32)
  valid = tf.logical_and(tf.cast(valid, tf.bool), scores > -np.inf)
  scores = tf.where(valid, scores, tf.constant(-np.inf, tf.float32))
  # Pad to k columns so top_k is defined for short candidate lists; -inf marks the empty slots.
  scores = tf.pad(scores, [[0, 0], [0, tf.maximum(k - tf.shape(scores)[1], 0)]], constant_values=-np.inf)
  best, positions = tf.math.top_k(scores, k=k)
  return tf.where(best > -np.inf, positions, -1)


def method_index(method: tf.Tensor | str) -> tf.Tensor:
  """The position of a method name in METHODS (int32 scalar); an unknown name fails with InvalidArgument."""
  method = tf.reshape(tf.convert_to_tensor(method, tf.string), [])
  index = tf.constant(-1)
  for i, name in enumerate(METHODS):
    index = tf.where(tf.equal(method, name), i, index)
  check = tf.debugging.Assert(
    index >= 0, ["diversity method must be one of none, ssd, dpp; got", method], name="check_method"
  )
  with tf.control_dependencies([check]):
    return tf.identity(index)


def checked_knobs(
  index: tf.Tensor, window: tf.Tensor | int, gamma: tf.Tensor | float, theta: tf.Tensor | float
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The knobs, checked where the method at `index` uses them (window for both, gamma for ssd, theta for dpp)."""
  return (
    _checked(knob_rules.WINDOW, window, index),
    _checked(knob_rules.GAMMA, gamma, index),
    _checked(knob_rules.THETA, theta, index),
  )


def rerank_numeric(
  index: tf.Tensor,
  embeddings: tf.Tensor,
  scores: tf.Tensor,
  valid: tf.Tensor,
  k: int,
  window: tf.Tensor,
  gamma: tf.Tensor,
  theta: tf.Tensor,
) -> tf.Tensor:
  """`rerank` after `method_index` and `checked_knobs`: no strings and no asserts, so a caller can
  compile it with XLA inside a larger function (the channel graph compiles its whole merge so)."""
  branches = [
    lambda: top_k(scores, valid, k),
    lambda: _ssd_numeric(embeddings, scores, valid, k, window, gamma, for_xla=True),
    lambda: _dpp_numeric(embeddings, scores, valid, k, theta, window, for_xla=True),
  ]
  return tf.ensure_shape(tf.switch_case(index, branches), [None, k])


def rerank(
  method: tf.Tensor | str,
  embeddings: tf.Tensor,
  scores: tf.Tensor,
  valid: tf.Tensor,
  k: int,
  window: tf.Tensor | int,
  gamma: tf.Tensor | float,
  theta: tf.Tensor | float,
  jit_compile: bool = False,
) -> tf.Tensor:
  """Re-ranks with the per-request `method`: "none" (top-k by score), "ssd" or "dpp".

  Only the chosen method runs (a `tf.switch_case`); its knobs are checked (window >= 1 for both,
  gamma >= 0 for ssd, 0 <= theta < 1 for dpp), and an unknown method or a bad knob fails the request
  with InvalidArgument. Arguments as in `ssd` and `dpp`; `jit_compile` compiles their loops with XLA
  (the string method cannot enter XLA, so the dispatch stays a plain graph).

  Returns:
    int32 [B, k] positions into n in pick order, -1 padded.
  """
  index = method_index(method)
  branches = [
    lambda: top_k(scores, valid, k),
    lambda: ssd(embeddings, scores, valid, k, window, gamma, jit_compile),
    lambda: dpp(embeddings, scores, valid, k, theta, window, jit_compile),
  ]
  return tf.ensure_shape(tf.switch_case(index, branches), [None, k])
