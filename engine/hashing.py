"""A learned binary hashing layer: linear projection + sign, trained to keep inner-product rankings."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from absl import logging

from engine import base, search_ops


class SignHash(tf.Module):
  """Maps float embeddings [B, d] to `bits` signs, packed 64 per int64 word for XOR + popcount.

  `bits = sign(x W + b)`. With W Gaussian and b = -mean(x) W this is random-hyperplane LSH (the
  baseline); `train_sign_hash` learns W and b instead.

  Args:
    projection: float32 [d, bits].
    bias: float32 [bits].
  """

  def __init__(self, projection: np.ndarray, bias: np.ndarray, name: str = "sign_hash"):
    super().__init__(name=name)
    check_bits(projection.shape[1])
    self.projection = tf.Variable(projection.astype(np.float32), trainable=False, name="projection")
    self.bias = tf.Variable(bias.astype(np.float32), trainable=False, name="bias")

  @property
  def bits(self) -> int:
    return int(self.projection.shape[1])

  def pack(self, embeddings: tf.Tensor) -> tf.Tensor:
    """int64 codes [B, bits / 64]: bit j of word w is 1 where (x W + b)[64 w + j] > 0."""
    positive = tf.cast(tf.matmul(tf.cast(embeddings, tf.float32), self.projection) + self.bias > 0, tf.int32)
    byte_bits = tf.reshape(positive, [-1, self.bits // 8, 8])
    weights = tf.constant([1 << j for j in range(8)], tf.int32)
    packed = tf.cast(tf.reduce_sum(byte_bits * weights, axis=-1), tf.uint8)  # [B, bits / 8], little-endian
    return tf.bitcast(tf.reshape(packed, [-1, self.bits // 64, 8]), tf.int64)

  def pack_numpy(self, embeddings: np.ndarray, chunk: int = 262_144) -> np.ndarray:
    """The same codes as `pack`, computed in NumPy for a whole catalog."""
    projection, bias = self.projection.numpy(), self.bias.numpy()
    out = np.empty([embeddings.shape[0], self.bits // 64], dtype=np.int64)
    for start in range(0, embeddings.shape[0], chunk):
      positive = embeddings[start : start + chunk] @ projection + bias > 0
      out[start : start + chunk] = np.packbits(positive, axis=1, bitorder="little").view("<i8")
    return out


def check_bits(bits: int) -> None:
  """Raises ValueError unless `bits` is a code length `SignHash` packs: a positive multiple of 64."""
  base.check_option("bits", bits, 64, valid="a positive multiple of 64")
  if bits % 64:
    raise ValueError(f"bits must be a positive multiple of 64, got {bits!r}")


def random_sign_hash(embeddings: np.ndarray, bits: int = 128, seed: int = 0) -> SignHash:
  """Random-hyperplane LSH, centred on the data mean (the baseline the learned layer must beat)."""
  check_bits(bits)
  rng = np.random.default_rng(seed)
  projection = rng.normal(size=[embeddings.shape[1], bits]).astype(np.float32)
  return SignHash(projection, -embeddings.mean(axis=0) @ projection)


def train_sign_hash(
  embeddings: np.ndarray,
  bits: int = 128,
  steps: int = 600,
  anchors_per_step: int = 128,
  neighbours: int = 32,
  negatives: int = 512,
  sample_size: int = 100_000,
  teacher_temperature: float = 0.05,
  seed: int = 0,
) -> SignHash:
  """Learns W, b so that Hamming similarity of the codes ranks items like their dot products.

  Listwise distillation: for each anchor item, its exact top `neighbours` within a sample of the
  catalog plus random `negatives` form a candidate list; the teacher distribution is a softmax of
  true dot products, the student a softmax of (scaled) code agreement. Codes are `sign(t)` in the
  forward pass with `t = tanh(x W + b)` for gradients (a straight-through estimator), plus a bit
  balance penalty so every bit splits the catalog. Starts from random hyperplanes. A catalog smaller than
  `anchors_per_step` or `neighbours` + 1 trains with all its items as anchors and the rest as neighbours.

  Args:
    embeddings: float32 [N, d] item embeddings.
    bits: code length, a positive multiple of 64.
    steps: Adam steps.
    anchors_per_step: anchors per step.
    neighbours: exact neighbours per anchor used as positives.
    negatives: random items shared by all anchors of a step.
    sample_size: catalog rows used for training.
    teacher_temperature: softmax temperature of the true dot products.
    seed: random seed.
  """
  check_bits(bits)  # Before TF sees a zero-width projection (bits=0 aborts the process in oneDNN).
  rng = np.random.default_rng(seed)
  sample = embeddings[rng.choice(embeddings.shape[0], min(sample_size, embeddings.shape[0]), replace=False)]
  anchor_rows = rng.choice(sample.shape[0], min(8192, sample.shape[0]), replace=False)
  # Shrunk to a small catalog: an anchor's neighbours are the other sampled items at most.
  neighbours = min(neighbours, sample.shape[0] - 1)
  anchors_per_step = min(anchors_per_step, anchor_rows.shape[0])
  neighbour_rows = search_ops.exact_top_k_numpy(sample[anchor_rows], sample, neighbours + 1)[:, 1:]

  init = random_sign_hash(sample, bits, seed)
  shrink = np.float32(1.0 / np.sqrt(embeddings.shape[1]))  # Keeps tanh out of saturation at the start.
  projection = tf.Variable(init.projection.numpy() * shrink, name="projection")
  bias = tf.Variable(init.bias.numpy() * shrink, name="bias")
  log_scale = tf.Variable(np.log(10.0), dtype=tf.float32, name="log_scale")
  optimizer = tf.keras.optimizers.Adam(learning_rate=0.01)
  sample_t = tf.constant(sample)
  neighbour_rows_t = tf.constant(neighbour_rows, tf.int32)
  anchor_rows_t = tf.constant(anchor_rows, tf.int32)

  def codes(x: tf.Tensor) -> tf.Tensor:
    t = tf.tanh(tf.matmul(x, projection) + bias)
    return t + tf.stop_gradient(tf.sign(t) - t)

  @tf.function
  def step(picks: tf.Tensor, negative_rows: tf.Tensor) -> tf.Tensor:
    anchors = tf.gather(sample_t, tf.gather(anchor_rows_t, picks))  # [A, d]
    positive = tf.gather(sample_t, tf.gather(neighbour_rows_t, picks))  # [A, P, d]
    negative = tf.gather(sample_t, negative_rows)  # [M, d]
    teacher = tf.concat([tf.einsum("ad,apd->ap", anchors, positive), tf.matmul(anchors, negative, transpose_b=True)], 1)
    with tf.GradientTape() as tape:
      anchor_codes = codes(anchors)
      agree_pos = tf.einsum("ab,apb->ap", anchor_codes, codes(positive)) / bits
      agree_neg = tf.matmul(anchor_codes, codes(negative), transpose_b=True) / bits
      student = tf.concat([agree_pos, agree_neg], 1) * tf.exp(log_scale)
      target = tf.nn.softmax(teacher / teacher_temperature)
      loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(target, student))
      balance = tf.reduce_mean(tf.square(tf.reduce_mean(tf.tanh(tf.matmul(negative, projection) + bias), 0)))
      total = loss + 0.1 * balance
    variables = [projection, bias, log_scale]
    optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
    return loss

  loss = float("nan")
  for i in range(steps):
    picks = rng.choice(anchor_rows.shape[0], anchors_per_step, replace=False)
    loss = float(step(tf.constant(picks, tf.int32), tf.constant(rng.choice(sample.shape[0], negatives), tf.int32)))
    if i % 200 == 0:
      logging.info("sign hash step %d: loss %.4f", i, loss)
  logging.info("sign hash trained: final loss %.4f", loss)
  return SignHash(projection.numpy(), bias.numpy())
