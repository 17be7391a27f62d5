"""Target attention and masked pooling against a NumPy reference."""

import numpy as np
import pytest
import tensorflow as tf

from models import layers


def _reference_attention(layer, target, sequence, mask):
  wq = layer.query_projection.kernel.numpy()
  wk = layer.key_projection.kernel.numpy()
  logits = np.einsum("bu,blu->bl", target @ wq, sequence @ wk) / np.sqrt(layer.units)
  out = np.zeros([sequence.shape[0], sequence.shape[2]], np.float32)
  for b in range(len(target)):
    if mask[b].any():
      valid = logits[b][mask[b]]
      weights = np.exp(valid - valid.max())
      weights /= weights.sum()
      out[b] = weights @ sequence[b][mask[b]]
  return out


def test_target_attention_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  target = rng.normal(size=[3, 8]).astype(np.float32)
  sequence = rng.normal(size=[3, 5, 8]).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=bool)
  layer = layers.TargetAttention(4)
  out = layer(tf.constant(target), tf.constant(sequence), tf.constant(mask)).numpy()
  np.testing.assert_allclose(out, _reference_attention(layer, target, sequence, mask), rtol=1e-5, atol=1e-6)

  # Whatever sits in padded positions must not change the output.
  noisy = sequence.copy()
  noisy[~mask] = 100.0
  out_noisy = layer(tf.constant(target), tf.constant(noisy), tf.constant(mask)).numpy()
  np.testing.assert_allclose(out, out_noisy, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out[2], np.zeros(8))  # Nothing to attend to.


def test_attention_weights_follow_the_target():
  # Two behaviours; the target equals the second one's key direction, so it must dominate.
  layer = layers.TargetAttention(2)
  sequence = tf.constant([[[1.0, 0.0], [0.0, 1.0]]])
  layer(tf.constant([[0.0, 1.0]]), sequence, tf.constant([[True, True]]))
  layer.query_projection.kernel.assign(np.eye(2, dtype=np.float32) * 10)
  layer.key_projection.kernel.assign(np.eye(2, dtype=np.float32))
  out = layer(tf.constant([[0.0, 1.0]]), sequence, tf.constant([[True, True]])).numpy()
  assert out[0, 1] > 0.99


@pytest.mark.parametrize("mask,expected", [([[1, 1, 0]], [[2.0]]), ([[0, 0, 0]], [[0.0]])])
def test_masked_mean(mask, expected):
  values = tf.constant([[[1.0], [3.0], [100.0]]])
  out = layers.masked_mean(values, tf.constant(np.array(mask, dtype=bool))).numpy()
  np.testing.assert_allclose(out, expected)


def test_hashed_embedding_masks_padding_and_embeds_unseen_values():
  embedding = layers.HashedEmbedding(100, 4)
  vectors, mask = embedding(tf.constant([["seen", "", "never-seen-before"]]))
  assert vectors.shape == (1, 3, 4)
  np.testing.assert_array_equal(mask.numpy(), [[True, False, True]])
