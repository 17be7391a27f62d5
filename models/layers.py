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


class SequenceEncoder(tf.keras.layers.Layer):
  """Self-attention blocks over a behaviour sequence (SASRec's encoder), with position embeddings.

  Each past interaction is re-encoded in the context of the others, so the representation of the
  most recent one says where the user is heading ("rated three Star Trek films in a row"), which a
  pooled bag of items cannot. Positions count back from the most recent interaction (position 0),
  so recency is learned whatever the sequence's length. Every position attends to every valid one:
  the whole sequence precedes the target, so no causal mask is needed. Padding is masked out and
  padded positions come out as zeros.

  Args:
    num_layers: transformer blocks (attention + feed-forward, each residual and layer-normalised).
    num_heads: attention heads per block.
    max_len: positions embedded; longer sequences must be cut to it before the call.
    dropout: dropout rate of the attention weights and each block's outputs, in training.
    dtype: Keras dtype policy.
  """

  def __init__(self, num_layers: int, num_heads: int, max_len: int, dropout: float = 0.1, dtype: Any = None, **kwargs):
    super().__init__(dtype=dtype, **kwargs)
    self.num_layers = num_layers
    self.num_heads = num_heads
    self.max_len = max_len
    self.dropout_rate = dropout

  def build(self, input_shape):
    dim = int(input_shape[-1])
    self.positions = self.add_weight(
      name="positions", shape=[self.max_len, dim], initializer=tf.keras.initializers.RandomNormal(stddev=0.02)
    )
    self.blocks = []
    for i in range(self.num_layers):
      self.blocks.append(
        (
          tf.keras.layers.MultiHeadAttention(
            self.num_heads,
            dim // self.num_heads,
            dropout=self.dropout_rate,
            dtype=self.dtype_policy,
            name=f"attention_{i}",
          ),
          tf.keras.layers.LayerNormalization(dtype=self.dtype_policy, name=f"attention_norm_{i}"),
          tf.keras.Sequential(
            [
              tf.keras.layers.Dense(dim, activation="relu", dtype=self.dtype_policy),
              tf.keras.layers.Dense(dim, dtype=self.dtype_policy),
            ],
            name=f"feed_forward_{i}",
          ),
          tf.keras.layers.LayerNormalization(dtype=self.dtype_policy, name=f"feed_forward_norm_{i}"),
        )
      )
    self.dropout = tf.keras.layers.Dropout(self.dropout_rate, dtype=self.dtype_policy)
    super().build(input_shape)

  def call(self, sequence: tf.Tensor, mask: tf.Tensor, training: bool | None = None) -> tf.Tensor:
    """Encodes sequence [B, L, D] (L <= max_len, position 0 the most recent) with mask [B, L]."""
    length = tf.shape(sequence)[1]
    valid = tf.cast(mask, sequence.dtype)[..., tf.newaxis]
    x = (sequence + tf.cast(self.positions[tf.newaxis, :length], sequence.dtype)) * valid
    x = self.dropout(x, training=training)
    attention_mask = tf.logical_and(mask[:, :, tf.newaxis], mask[:, tf.newaxis, :])
    # Layer normalisation outputs float32 under a mixed policy: cast back before each residual sum.
    for attention, attention_norm, feed_forward, feed_forward_norm in self.blocks:
      attended = attention(x, x, attention_mask=attention_mask, training=training)
      x = tf.cast(attention_norm(x + self.dropout(attended, training=training)), sequence.dtype)
      x = tf.cast(feed_forward_norm(x + self.dropout(feed_forward(x), training=training)), sequence.dtype) * valid
    return x
