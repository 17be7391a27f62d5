"""Small Keras layers the towers are made of: hashed embeddings, masked pooling, target attention."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from models.data import schema


class HashedEmbedding(tf.keras.layers.Layer):
  """Embeds strings through a hash, so unseen values (new ads, new tokens) still get a vector.

  The padding value "" maps to bucket 0 and is reported as masked. Hashing (`lookup`) and embedding
  (`embed`) are separate steps so that everything after the string ops can be compiled with XLA,
  which has no string kernels.

  Args:
    num_buckets: hash buckets, bucket 0 being reserved for padding.
    dim: embedding width.
    dtype: Keras dtype policy; under a mixed policy the table stays float32 and the output is cast.
  """

  def __init__(self, num_buckets: int, dim: int, dtype: Any = None, **kwargs):
    super().__init__(dtype=dtype, **kwargs)
    self.hashing = tf.keras.layers.Hashing(num_bins=num_buckets, mask_value=schema.PAD)
    self.embedding = tf.keras.layers.Embedding(num_buckets, dim, dtype=dtype)

  def lookup(self, values: tf.Tensor) -> tf.Tensor:
    """Hash buckets (int64, 0 for padding) of a string tensor."""
    return self.hashing(values)

  def embed(self, buckets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (embeddings [..., dim], mask [...]) of hash buckets from `lookup`."""
    return self.embedding(buckets), tf.not_equal(buckets, 0)

  def call(self, values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (embeddings [..., dim], mask [...]) of a string tensor."""
    return self.embed(self.lookup(values))


def masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
  """Mean of values [B, L, D] over positions where mask [B, L] is set; zeros for empty rows."""
  weights = tf.cast(mask, values.dtype)[..., tf.newaxis]
  total = tf.reduce_sum(values * weights, axis=1)
  return total / tf.maximum(tf.reduce_sum(weights, axis=1), tf.constant(1.0, values.dtype))


def masked_attention_pool(logits: tf.Tensor, sequence: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
  """Softmax of logits [B, L] over unmasked positions, then the weighted sum of sequence [B, L, D].

  The softmax runs in float32 even under mixed precision, so masked logits stay far below the rest;
  padded positions get zero weight and a row with no valid position pools to zeros.
  """
  logits = tf.cast(logits, tf.float32)
  logits = tf.where(mask, logits, tf.constant(-1e9, tf.float32))
  weights = tf.nn.softmax(logits, axis=-1) * tf.cast(mask, tf.float32)
  return tf.einsum("bl,bld->bd", tf.cast(weights, sequence.dtype), sequence)


class TargetAttention(tf.keras.layers.Layer):
  """Scaled dot-product attention of one target vector over a padded sequence.

  The target (the query, or the current context) decides which past behaviours matter, as in DIN:
  a user who clicked shoes and phones gets their phone clicks weighted up when searching "charger".
  Padded positions get zero weight, and a sequence with no valid position attends to nothing.

  Args:
    units: width of the query/key projections.
    dtype: Keras dtype policy of the projections.
  """

  def __init__(self, units: int, dtype: Any = None, **kwargs):
    super().__init__(dtype=dtype, **kwargs)
    self.units = units
    self.query_projection = tf.keras.layers.Dense(units, use_bias=False, dtype=dtype)
    self.key_projection = tf.keras.layers.Dense(units, use_bias=False, dtype=dtype)

  def call(self, target: tf.Tensor, sequence: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Attends target [B, D] over sequence [B, L, D] with mask [B, L]; returns [B, D]."""
    query = self.query_projection(target)
    keys = self.key_projection(sequence)
    logits = tf.cast(tf.einsum("bu,blu->bl", query, keys), tf.float32) / (self.units**0.5)
    return masked_attention_pool(logits, sequence, mask)


class MlpAttention(tf.keras.layers.Layer):
  """DIN's attention unit: an MLP scores each behaviour from [target, key, target - key, target * key].

  Unlike a dot product, the MLP can learn non-linear relevance (a "charger" query matching phone
  clicks but not phone-case clicks). Scores are normalised with a masked softmax, so padding gets
  zero weight exactly as in `TargetAttention`.

  Args:
    hidden_units: widths of the scoring MLP's ReLU layers.
    dtype: Keras dtype policy of the MLP.
  """

  def __init__(self, hidden_units: tuple[int, ...] = (64, 32), dtype: Any = None, **kwargs):
    super().__init__(dtype=dtype, **kwargs)
    self.scorer = tf.keras.Sequential(
      [tf.keras.layers.Dense(units, activation="relu", dtype=dtype) for units in hidden_units]
      + [tf.keras.layers.Dense(1, dtype=dtype)],
      name="scorer",
    )

  def call(self, target: tf.Tensor, sequence: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Attends target [B, D] over sequence [B, L, D] with mask [B, L]; returns [B, D]."""
    target = tf.cast(target, sequence.dtype)
    tiled = tf.broadcast_to(target[:, tf.newaxis, :], tf.shape(sequence))
    pairs = tf.concat([tiled, sequence, tiled - sequence, tiled * sequence], axis=-1)
    logits = tf.squeeze(self.scorer(pairs), axis=-1)
    return masked_attention_pool(logits, sequence, mask)


def mlp(hidden_units: tuple[int, ...], output_dim: int, name: str, dtype: Any = None) -> tf.keras.Sequential:
  """ReLU layers (in the given dtype policy) followed by a linear projection with a float32 output."""
  layers = [tf.keras.layers.Dense(units, activation="relu", dtype=dtype) for units in hidden_units]
  layers.append(tf.keras.layers.Dense(output_dim, dtype="float32"))
  return tf.keras.Sequential(layers, name=name)
