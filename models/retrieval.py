"""The two-tower retrieval model trained with TFRS's in-batch softmax Retrieval task."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from models import distribute, sampling, towers
from models.config import TowerConfig
from models.data import schema


class RetrievalModel(tfrs.Model):
  """Query and item towers trained so that a query scores its clicked ad above the batch's others.

  The loss is TFRS's in-batch softmax (`tfrs.tasks.Retrieval`) with a temperature, and with
  accidental hits (the same ad twice in a batch, frequent under Zipf popularity) removed. Optionally
  (`set_sampling`) each logit is corrected by the log of its item's sampling probability, and extra
  uniformly drawn catalog items join the candidates as negatives. Top-k accuracy over the whole
  catalog is computed separately by `models.evaluation`, against the item tower as it is then.

  `config.objective` sets what a positive is worth: every click alike, clicks plus relevance
  (`relevance_loss`), or clicks weighted by their value (`value_weights`).

  Args:
    config: tower configuration.
  """

  def __init__(self, config: TowerConfig):
    super().__init__()
    self.config = config
    self.query_tower, self.item_tower = towers.build_towers(config)
    self.task = tfrs.tasks.Retrieval(temperature=config.temperature, remove_accidental_hits=True)
    if config.objective == "relevance":
      # Where a same-category score turns into a relevance probability: logit = score / T - offset.
      self.relevance_offset = tf.Variable(0.0, name="relevance_offset")
    self._frequencies: sampling.ItemFrequencies | None = None
    self._probability_table: tf.Tensor | None = None
    self._probability_table_max: float | None = None
    self._num_negatives = 0
    self._num_items = 0

  def set_sampling(
    self, frequencies: sampling.ItemFrequencies | None, num_negatives: int = 0, num_items: int = 0
  ) -> None:
    """Turns on the logQ correction (when `frequencies` is given) and mixed negatives.

    Args:
      frequencies: item counts of the training stream; None trains without the correction.
      num_negatives: uniformly sampled catalog items added to each batch's candidates; batches must
        then carry their features under `sampling.NEGATIVE_PREFIX`.
      num_items: catalog size (the uniform draws' support), needed for the mixture probability.
    """
    if num_negatives and num_items <= 0:
      raise ValueError("Mixed negatives need the catalog size")
    self._frequencies = frequencies
    table = None if frequencies is None else frequencies.probability_table()
    self._probability_table = None if table is None else tf.constant(table)
    self._probability_table_max = None if table is None else float(table.max())
    self._num_negatives = num_negatives
    self._num_items = num_items

  def unigram_probability(self, candidate_ids: tf.Tensor) -> tf.Tensor | None:
    """In-batch sampling probability of each candidate id, or None without logQ."""
    if self._frequencies is None:
      return None
    return tf.gather(self._probability_table, self._frequencies.bucket(candidate_ids))

  def candidate_probability(self, unigram: tf.Tensor | None, batch_size: tf.Tensor) -> tf.Tensor | None:
    """Sampling probability of each candidate relative to the most popular item's, or None without logQ.

    Args:
      unigram: `unigram_probability` of the candidates.
      batch_size: in-batch candidates (the global batch's positives).
    """
    if unigram is None:
      return None
    head = self._probability_table_max
    if self._num_negatives:
      unigram = sampling.mixture_probability(unigram, batch_size, self._num_negatives, self._num_items)
      head = sampling.mixture_probability(head, batch_size, self._num_negatives, self._num_items)
    # Relative to the most popular item: the softmax only sees ratios, and TFRS clips probabilities
    # at 1e-6, which in a large catalog would flatten the whole tail if they were absolute.
    return unigram / head

  def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
    query_embeddings = self.query_tower(features, training=training)
    item_embeddings = self.item_tower(features, training=training)
    local_items = item_embeddings
    candidate_ids = features[schema.AD_ID]
    unigram = self.unigram_probability(candidate_ids)
    # Under multi-worker training, every replica's positives: the global batch's in-batch negatives.
    item_embeddings, candidate_ids, unigram = distribute.global_candidates(item_embeddings, candidate_ids, unigram)
    num_positives = tf.shape(item_embeddings)[0]
    if self._num_negatives and sampling.NEGATIVE_PREFIX + schema.AD_ID in features:
      negatives = {name: features[sampling.NEGATIVE_PREFIX + name] for name in schema.ITEM_FEATURE_NAMES}
      item_embeddings = tf.concat([item_embeddings, self.item_tower(negatives, training=training)], axis=0)
      candidate_ids = tf.concat([candidate_ids, negatives[schema.AD_ID]], axis=0)
      if unigram is not None:
        unigram = tf.concat([unigram, self.unigram_probability(negatives[schema.AD_ID])], axis=0)
    probability = self.candidate_probability(unigram, num_positives)
    loss = self.task(
      query_embeddings,
      item_embeddings,
      sample_weight=value_weights(features, self.config) if self.config.objective == "value" else None,
      candidate_ids=candidate_ids,
      candidate_sampling_probability=probability,
      compute_metrics=False,
    )
    if self.config.objective == "relevance":
      loss += self.config.relevance_weight * self.relevance_loss(
        query_embeddings, local_items, features[schema.CATEGORY]
      )
    return loss

  def relevance_loss(self, query_embeddings: tf.Tensor, item_embeddings: tf.Tensor, categories: tf.Tensor) -> tf.Tensor:
    """Binary cross-entropy of "same category" over every (query, in-batch item) pair of this replica.

    A query's relevant items are those of its clicked ad's category. Scoring the other categories'
    items low, whatever their popularity, is what keeps the semantic channel's noise ratio low; the
    softmax alone only ranks the clicked item first. Computed over the replica's own batch: the
    categories are strings, which collectives do not carry.
    """
    scores = tf.matmul(query_embeddings, item_embeddings, transpose_b=True)
    relevant = tf.cast(tf.equal(categories[:, tf.newaxis], categories[tf.newaxis, :]), tf.float32)
    logits = scores / self.config.temperature - self.relevance_offset
    per_pair = tf.nn.sigmoid_cross_entropy_with_logits(labels=relevant, logits=logits)
    # Summed over queries like the Retrieval task's loss (TFRS reduces with SUM), averaged over items.
    return tf.reduce_sum(tf.reduce_mean(per_pair, axis=1))

  def train_step(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """tfrs.Model's step, plus loss scaling when the optimizer is a LossScaleOptimizer (float16)."""
    if not isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
      return super().train_step(inputs)
    with tf.GradientTape() as tape:
      loss = self.compute_loss(inputs, training=True)
      total_loss = loss + sum(self.losses)
      scaled_loss = self.optimizer.get_scaled_loss(total_loss)
    gradients = self.optimizer.get_unscaled_gradients(tape.gradient(scaled_loss, self.trainable_variables))
    self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
    return {"loss": loss, "regularization_loss": total_loss - loss, "total_loss": total_loss}


def value_weights(features: dict[str, tf.Tensor], config: TowerConfig) -> tf.Tensor:
  """Each example's value, (1 + conversion_weight if converted) * bid ** bid_exponent, over its batch mean.

  Normalised to mean 1, so the value only moves weight between positives and the loss keeps the
  scale (and learning rate) that clicks alone give. Computed as logarithms, scaled by the batch's
  largest value: the value itself overflows float32 for bids in micros at bid_exponent 5, or bids
  near float32's largest, and inf / inf made the loss NaN (or a sum overflowing made every weight 0).
  """
  converted = tf.cast(features[schema.CONVERTED], tf.float32)
  bid = tf.maximum(tf.cast(features[schema.BID], tf.float32), 0.0)
  log_value = tf.math.log1p(config.conversion_weight * converted)
  if config.bid_exponent:  # bid ** 0 is 1, even for a bid of 0 (whose log is -inf).
    log_value += config.bid_exponent * tf.math.log(bid)
  largest = tf.reduce_max(log_value)
  # Every value 0 (every bid 0): the weights are 0, as the plain quotient gave.
  value = tf.exp(log_value - tf.where(tf.math.is_finite(largest), largest, 0.0))
  return value / tf.maximum(tf.reduce_mean(value), 1e-12)


def training_fields(config: TowerConfig) -> tuple[str, ...]:
  """Example fields besides the features that `config.objective` reads."""
  return (schema.CONVERTED, schema.BID) if config.objective == "value" else ()


def example_signature(config: TowerConfig | None = None) -> dict[str, tf.TensorSpec]:
  """tf.data signature of a batch of training examples (query + positive item features + objective fields)."""
  signature = {name: schema.feature_spec(name) for name in schema.QUERY_FEATURE_NAMES + schema.ITEM_FEATURE_NAMES}
  if config is not None and config.objective == "value":
    signature[schema.CONVERTED] = tf.TensorSpec([None], tf.bool, name=schema.CONVERTED)
    signature[schema.BID] = tf.TensorSpec([None], tf.float32, name=schema.BID)
  return signature


def build_towers_for_restore(config: TowerConfig) -> RetrievalModel:
  """A model whose variables exist, ready for `load_weights` (subclassed models build lazily)."""
  model = RetrievalModel(config)
  dummy = {
    name: tf.constant([[schema.PAD]] if spec.shape.rank == 2 else [schema.PAD])
    for name, spec in example_signature().items()
  }
  model.query_tower(dummy)
  model.item_tower(dummy)
  return model


def make_optimizer(learning_rate: float, precision: str) -> tf.keras.optimizers.Optimizer:
  """Adam; wrapped in dynamic loss scaling under mixed_float16, whose gradients would underflow."""
  optimizer = tf.keras.optimizers.Adam(learning_rate)
  if precision == "mixed_float16":
    optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
  return optimizer
