"""engine.diversity against straightforward NumPy greedy SSD and DPP, in graphs, XLA and a SavedModel."""

import numpy as np
import pytest
import tensorflow as tf

from engine import diversity

# The references below stop where TF's DPP does, and report the smallest gap between the best and
# the second-best gain over all steps: inputs are only used when that gap is above _MARGIN, far above
# float32 rounding of the gains (~1e-5), so picks must then be equal exactly.
_MARGIN = 1e-3


def _unit(x: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return np.where(norm > 0, x / np.maximum(norm, 1e-12), 0.0)


def _residual(vector: np.ndarray, window: np.ndarray) -> float:
  """Norm of `vector` orthogonal to the span of the rows of `window`, by explicit Gram-Schmidt."""
  basis = []
  for row in window:
    for q in basis:
      row = row - (row @ q) * q
    if np.linalg.norm(row) > 1e-6:
      basis.append(row / np.linalg.norm(row))
  for q in basis:
    vector = vector - (vector @ q) * q
  return float(np.linalg.norm(vector))


def _gap(gains: np.ndarray) -> float:
  finite = np.sort(gains[np.isfinite(gains)])
  return float(finite[-1] - finite[-2]) if len(finite) > 1 else np.inf


def ssd_reference(v, scores, valid, k, window, gamma) -> tuple[np.ndarray, float]:
  v = _unit(v.astype(np.float64))
  picks, margin = [], np.inf
  for _ in range(k):
    gains = np.full(len(scores), -np.inf)
    for i in np.flatnonzero(valid):
      if i not in picks:
        gains[i] = scores[i] + gamma * _residual(v[i], v[picks[-window:]] if picks else v[:0])
    if not np.isfinite(gains).any():
      break
    margin = min(margin, _gap(gains))
    picks.append(int(np.argmax(gains)))
  return np.array(picks + [-1] * (k - len(picks))), margin


def dpp_reference(v, scores, valid, k, window, theta) -> tuple[np.ndarray, float]:
  """Greedy MAP maximising log det L_Y directly, L = diag(q) S diag(q), over the last `window` picks."""
  v = _unit(v.astype(np.float64))
  alpha = theta / (2 * (1 - theta))
  q = np.exp(alpha * scores.astype(np.float64))
  kernel = q[:, None] * (v @ v.T) * q[None, :]
  similarity = v @ v.T
  picks, margin = [], np.inf
  for _ in range(k):
    recent = picks[-window:]
    base = np.linalg.slogdet(similarity[np.ix_(recent, recent)])[1] if recent else 0.0
    gains = np.full(len(scores), -np.inf)
    for i in np.flatnonzero(valid):
      if i in picks:
        continue
      rows = recent + [i]
      sign, logdet_s = np.linalg.slogdet(similarity[np.ix_(rows, rows)])
      if sign > 0 and logdet_s - base > np.log(diversity._MIN_DPP_RESIDUAL2):  # Same stop as TF's.
        gains[i] = np.linalg.slogdet(kernel[np.ix_(rows, rows)])[1]
    if not np.isfinite(gains).any():
      break
    margin = min(margin, _gap(gains))
    picks.append(int(np.argmax(gains)))
  return np.array(picks + [-1] * (k - len(picks))), margin


def _inputs(seed: int, batch: int = 3, n: int = 24, d: int = 8, invalid: float = 0.25):
  rng = np.random.default_rng(seed)
  embeddings = (rng.normal(size=[batch, n, d]) * rng.uniform(0.5, 2.0, size=[batch, n, 1])).astype(np.float32)
  scores = rng.normal(size=[batch, n]).astype(np.float32)
  valid = rng.uniform(size=[batch, n]) > invalid
  return embeddings, scores, valid


def _check(method, reference, inputs, k, window, knob):
  embeddings, scores, valid = inputs
  got = method(embeddings, scores, valid, k, window, knob)
  for b in range(len(scores)):
    expected, margin = reference(embeddings[b], scores[b], valid[b], k, window, knob)
    assert margin > _MARGIN, f"row {b}: gains too close ({margin}) to compare picks"
    np.testing.assert_array_equal(got[b], expected, err_msg=f"row {b}")


def _wrap(method, jit: bool):
  """`method` in one tf.function per test module, called with NumPy inputs and Python knobs."""
  f = tf.function(
    lambda e, s, m, k, w, knob: method(e, s, m, k, w, knob, jit_compile=jit), reduce_retracing=True, autograph=False
  )
  return lambda e, s, m, k, w, knob: f(e, s, m, k, tf.constant(w), tf.constant(knob, tf.float32)).numpy()


_SSD = {jit: _wrap(diversity.ssd, jit) for jit in (False, True)}
# dpp takes (theta, window); the wrappers and references take (window, knob).
_DPP = {
  jit: _wrap(lambda e, s, m, k, w, t, jit_compile: diversity.dpp(e, s, m, k, t, w, jit_compile), jit)
  for jit in (False, True)
}


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("window", [1, 3, 10])
def test_ssd_matches_reference(jit, window):
  # k = 10 picks out of ~18 valid; window 10 >= k never slides, window 1 only avoids the last pick.
  _check(_SSD[jit], ssd_reference, _inputs(window), k=10, window=window, knob=0.7)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("window", [1, 3, 10])
def test_dpp_matches_reference(jit, window):
  # d = 8 < k = 10: without a slide the DPP stops after 8 picks (S has rank 8), padding -1.
  _check(_DPP[jit], dpp_reference, _inputs(10 + window), k=10, window=window, knob=0.6)


def test_ssd_with_duplicates_in_the_window():
  # Every candidate has a scaled copy, and gamma is small, so copies are picked while their original
  # is in the window (they add no direction) and stay after it leaves (they take over its direction).
  embeddings, scores, valid = _inputs(31, batch=2, n=16, d=6, invalid=0.0)
  embeddings[:, 8:] = 3.0 * embeddings[:, :8]
  _check(_SSD[False], ssd_reference, (embeddings, scores, valid), k=12, window=3, knob=0.3)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_ssd_duplicate_keeps_the_direction_of_its_leaving_original(jit):
  # A' duplicates A and is picked right after it (adding no direction); when A leaves the window of 2,
  # A' still spans e1, so X (mostly e1) must keep its small residual and lose to W at step 3.
  a, a_copy, x, y, w = np.eye(4)[0], 2 * np.eye(4)[0], [0.9, 0.436, 0, 0], np.eye(4)[2], np.eye(4)[3]
  embeddings = np.array([[a, a_copy, x, y, w]], np.float32)
  scores = np.array([[3.0, 2.9, 2.0, 1.999, 1.995]], np.float32)
  valid = np.ones([1, 5], bool)
  got = _SSD[jit](embeddings, scores, valid, 5, 2, 0.05)
  np.testing.assert_array_equal(got[0], [0, 1, 3, 4, 2])
  _check(_SSD[jit], ssd_reference, (embeddings, scores, valid), k=5, window=2, knob=0.05)


def test_dpp_without_window_is_the_plain_greedy():
  embeddings, scores, valid = _inputs(12)
  plain = diversity.dpp(embeddings, scores, valid, 10, 0.6).numpy()  # Eager, too.
  np.testing.assert_array_equal(plain, _DPP[False](embeddings, scores, valid, 10, 10, 0.6))


def test_more_picks_than_valid_candidates_pads():
  embeddings, scores, valid = _inputs(5, batch=2, n=12, d=16, invalid=0.5)
  valid[1] = False  # A row with nothing to pick.
  k = 14
  for method, reference, knob in ((_SSD[False], ssd_reference, 0.5), (_DPP[False], dpp_reference, 0.5)):
    got = method(embeddings, scores, valid, k, 4, knob)
    for b in range(2):
      np.testing.assert_array_equal(got[b], reference(embeddings[b], scores[b], valid[b], k, 4, knob)[0])
    assert (got[0] >= 0).sum() == valid[0].sum()
    assert (got[1] == -1).all()


# A serving module as the multi-channel graph would export it: method and knobs are inputs, candidates
# dynamic in batch and n. One per test module, traced once for the rerank-level tests below.
_K = 5
_MODULE = tf.Module()


def _signature(jit: bool):
  @tf.function
  def rerank(embeddings, scores, valid, method, window, gamma, theta):
    return {"positions": diversity.rerank(method, embeddings, scores, valid, _K, window, gamma, theta, jit_compile=jit)}

  return rerank.get_concrete_function(
    tf.TensorSpec([None, None, None], tf.float32, name="embeddings"),
    tf.TensorSpec([None, None], tf.float32, name="scores"),
    tf.TensorSpec([None, None], tf.bool, name="valid"),
    tf.TensorSpec([], tf.string, name="method"),
    tf.TensorSpec([], tf.int32, name="window"),
    tf.TensorSpec([], tf.float32, name="gamma"),
    tf.TensorSpec([], tf.float32, name="theta"),
  )


_SIGNATURES = {jit: _signature(jit) for jit in (False, True)}


def _serve(method, embeddings, scores, valid, window=3, gamma=0.5, theta=0.5, function=_SIGNATURES[False]):
  inputs = {"embeddings": embeddings, "scores": scores, "valid": valid, "method": method}
  inputs |= {"window": np.int32(window), "gamma": np.float32(gamma), "theta": np.float32(theta)}
  return function(**{name: tf.constant(value) for name, value in inputs.items()})["positions"].numpy()


def test_no_candidates_and_non_finite_scores_are_never_picked():
  scores = np.array([[1.0, -np.inf, np.nan, 0.5]], np.float32)
  embeddings = np.eye(4, dtype=np.float32)[None]
  for method in diversity.METHODS:
    np.testing.assert_array_equal(_serve(method, embeddings, scores, np.ones([1, 4], bool)), [[0, 3] + [-1] * 3])
    empty = _serve(method, np.zeros([2, 0, 4], np.float32), np.zeros([2, 0], np.float32), np.zeros([2, 0], bool))
    np.testing.assert_array_equal(empty, -np.ones([2, _K]), err_msg=method)


def test_gamma_zero_is_top_k():
  embeddings, scores, valid = _inputs(6)
  top = diversity.top_k(scores, valid, 10).numpy()
  np.testing.assert_array_equal(_SSD[False](embeddings, scores, valid, 10, 3, 0.0), top)
  order = np.argsort(-np.where(valid, scores, -np.inf), axis=1)[:, :10]
  np.testing.assert_array_equal(top, order)


def _clustered(seed: int = 0, clusters: int = 5, per_cluster: int = 8, d: int = 16):
  """Tight clusters of items; the first cluster has all the best scores."""
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=[clusters, d]))
  embeddings = np.repeat(centres, per_cluster, axis=0) + 0.05 * rng.normal(size=[clusters * per_cluster, d])
  scores = np.repeat(np.linspace(1.0, 0.5, clusters), per_cluster) + 0.01 * rng.normal(size=clusters * per_cluster)
  valid = np.ones(clusters * per_cluster, bool)
  return embeddings[None].astype(np.float32), scores[None].astype(np.float32), valid[None]


def _intra_list_distance(embeddings: np.ndarray, picks: np.ndarray) -> float:
  v = _unit(embeddings[picks[picks >= 0]])
  similarity = v @ v.T
  n = len(v)
  return float((n * n - similarity.sum()) / (n * (n - 1)))


def test_diversity_raises_intra_list_distance():
  embeddings, scores, valid = _clustered()
  distance = {
    method: _intra_list_distance(embeddings[0], _serve(method, embeddings, scores, valid, window=5, gamma=1.0)[0])
    for method in diversity.METHODS
  }
  assert distance["none"] < 0.05  # All five from the best cluster.
  assert distance["ssd"] > 0.5 and distance["dpp"] > 0.5, distance


def test_saved_model_answers_the_same(tmp_path):
  tf.saved_model.save(
    _MODULE, str(tmp_path), signatures={"rerank": _SIGNATURES[False], "rerank_xla": _SIGNATURES[True]}
  )
  loaded = tf.saved_model.load(str(tmp_path))
  embeddings, scores, valid = _inputs(7, batch=2, n=20, d=8)
  for method in diversity.METHODS:
    expected = _serve(method, embeddings, scores, valid)
    for name in ("rerank", "rerank_xla"):  # The XLA signature compiles only after loading.
      got = _serve(method, embeddings, scores, valid, function=loaded.signatures[name])
      np.testing.assert_array_equal(got, expected, err_msg=f"{name} {method}")


@pytest.mark.parametrize(
  "method, knobs, message",
  [
    ("mmr", {}, "method must be one of none, ssd, dpp"),
    ("ssd", {"window": 0}, "window must be >= 1"),
    ("ssd", {"gamma": -0.1}, "gamma must be a finite number >= 0"),
    ("dpp", {"theta": 1.0}, r"theta must be in \[0, 1\)"),
    ("dpp", {"theta": -0.5}, r"theta must be in \[0, 1\)"),
  ],
)
def test_bad_method_or_knob_is_invalid_argument(method, knobs, message):
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    _serve(method, *_inputs(8, batch=1, n=10), **knobs)
