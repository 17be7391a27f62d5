"""Small Keras layers the towers are made of: hashed embeddings, masked pooling, target attention."""

from __future__ import annotations

import tensorflow as tf

from models.data import schema


class HashedEmbedding(tf.keras.layers.Layer):
  """Embeds strings through a hash, so unseen values (new ads, new tokens) still get a vector.

  The padding value "" maps to bucket 0 and is reported as masked.

  Args:
    num_buckets: hash buckets, bucket 0 being reserved for padding.
    dim: embedding width.
  """

  def __init__(self, num_buckets: int, dim: int, **kwargs):
    super().__init__(**kwargs)
    self.hashing = tf.keras.layers.Hashing(num_bins=num_buckets, mask_value=schema.PAD)
    self.embedding = tf.keras.layers.Embedding(num_buckets, dim)

  def call(self, values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (embeddings [..., dim], mask [...]) of a string tensor."""
    return self.embedding(self.hashing(values)), tf.not_equal(values, schema.PAD)


def masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
  """Mean of values [B, L, D] over positions where mask [B, L] is set; zeros for empty rows."""
  weights = tf.cast(mask, values.dtype)[..., tf.newaxis]
  total = tf.reduce_sum(values * weights, axis=1)
  return total / tf.maximum(tf.reduce_sum(weights, axis=1), tf.constant(1.0, values.dtype))


class TargetAttention(tf.keras.layers.Layer):
  """Scaled dot-product attention of one target vector over a padded sequence.

  The target (the query, or the current context) decides which past behaviours matter, as in DIN:
  a user who clicked shoes and phones gets their phone clicks weighted up when searching "charger".
  Padded positions get zero weight, and a sequence with no valid position attends to nothing.

  Args:
    units: width of the query/key projections.
  """

  def __init__(self, units: int, **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.query_projection = tf.keras.layers.Dense(units, use_bias=False)
    self.key_projection = tf.keras.layers.Dense(units, use_bias=False)

  def call(self, target: tf.Tensor, sequence: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Attends target [B, D] over sequence [B, L, D] with mask [B, L]; returns [B, D]."""
    query = self.query_projection(target)
    keys = self.key_projection(sequence)
    # Softmax in float32 even under mixed precision: masked logits must stay far below the rest.
    logits = tf.cast(tf.einsum("bu,blu->bl", query, keys), tf.float32) / (self.units ** 0.5)
    logits = tf.where(mask, logits, tf.constant(-1e9, tf.float32))
    weights = tf.nn.softmax(logits, axis=-1) * tf.cast(mask, tf.float32)
    return tf.einsum("bl,bld->bd", tf.cast(weights, sequence.dtype), sequence)


def mlp(hidden_units: tuple[int, ...], output_dim: int, name: str) -> tf.keras.Sequential:
  """ReLU layers followed by a linear projection to the output width, with a float32 output."""
  layers = [tf.keras.layers.Dense(units, activation="relu") for units in hidden_units]
  layers.append(tf.keras.layers.Dense(output_dim, dtype="float32"))
  return tf.keras.Sequential(layers, name=name)
