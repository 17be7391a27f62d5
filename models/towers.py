"""The query tower and the item (ad) tower of the two-tower retrieval model.

Retrieval is factorised into two towers so that the catalog side can be computed ahead of time and
indexed: relevance is the dot product of a query embedding and an item embedding, both L2-normalised.
The towers share the item-feature and token embeddings, so a behaviour sequence, a query and an ad
speak the same vocabulary, and an ad never seen in training still gets a vector from its side info.

Each tower runs in two steps: `lookup` hashes the string features into buckets, and `encode` does
everything numeric. Only `encode` can be compiled with XLA (XLA has no string kernels), which is what
`jit_compile` switches on. Under a mixed-precision `TowerConfig.precision` every layer computes in
the mixed dtype while variables and the output embeddings stay float32, so `tfrs.tasks.Retrieval`
and the index always see float32 (a global mixed policy breaks Retrieval: TFRS issue #498).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from models import layers
from models.config import TowerConfig
from models.data import schema

Buckets = dict[str, tf.Tensor]


class ItemFeatureEmbedding(tf.keras.layers.Layer):
  """Embeds an item's id, category and brand; shared by the item tower and the behaviour sequence.

  Args:
    config: tower configuration.
  """

  def __init__(self, config: TowerConfig, **kwargs):
    super().__init__(dtype=config.precision, **kwargs)
    self.ids = layers.HashedEmbedding(config.id_buckets, config.embedding_dim, dtype=config.precision, name="ad_id")
    self.categories = layers.HashedEmbedding(
      config.side_buckets, config.embedding_dim, dtype=config.precision, name="category"
    )
    self.brands = layers.HashedEmbedding(
      config.side_buckets, config.embedding_dim, dtype=config.precision, name="brand"
    )

  def lookup(self, ad_ids: tf.Tensor, categories: tf.Tensor, brands: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """Hash buckets of (id, category, brand)."""
    return self.ids.lookup(ad_ids), self.categories.lookup(categories), self.brands.lookup(brands)

  def embed(
    self, id_buckets: tf.Tensor, category_buckets: tf.Tensor, brand_buckets: tf.Tensor
  ) -> tuple[tf.Tensor, ...]:
    """Returns (id, category, brand) embeddings and the id mask, from `lookup`'s buckets."""
    id_embedding, mask = self.ids.embed(id_buckets)
    category_embedding, _ = self.categories.embed(category_buckets)
    brand_embedding, _ = self.brands.embed(brand_buckets)
    return id_embedding, category_embedding, brand_embedding, mask

  def call(self, ad_ids: tf.Tensor, categories: tf.Tensor, brands: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """Returns (id, category, brand) embeddings and the id mask."""
    return self.embed(*self.lookup(ad_ids, categories, brands))


class Tower(tf.keras.Model):
  """A tower that hashes its string features (`lookup`) and then computes (`encode`), optionally in XLA.

  XLA applies to inference only: training steps run `encode` as part of Keras' own train function.

  Args:
    config: tower configuration.
  """

  def __init__(self, config: TowerConfig, **kwargs):
    super().__init__(**kwargs)
    self.config = config
    self.jit_compile = False

  def get_config(self) -> dict:
    return {"tower_config": dataclasses.asdict(self.config)}

  def lookup(self, features: dict[str, tf.Tensor]) -> Buckets:
    """Hash buckets of every string feature the tower reads."""
    raise NotImplementedError

  def encode(self, buckets: Buckets, training: bool | None = None) -> tf.Tensor:
    """The L2-normalised float32 embedding [B, output_dim] of `lookup`'s buckets."""
    raise NotImplementedError

  def call(self, features: dict[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
    buckets = self.lookup(features)
    if training or not self.jit_compile:
      return self.encode(buckets, training=training)
    compiled = self.__dict__.get("_compiled_encode")
    if compiled is None:
      # Kept out of Keras' attribute tracking: the compiled function is a view of `encode`, not state.
      compiled = tf.function(self.encode, jit_compile=True, reduce_retracing=True)
      self.__dict__["_compiled_encode"] = compiled
    return compiled(buckets)


HISTORY = (schema.HIST_IDS, schema.HIST_CATEGORIES, schema.HIST_BRANDS)


def checked_history(features: dict[str, tf.Tensor], ids_apart: bool) -> tuple[tf.Tensor, ...]:
  """The behaviour history (ids, categories, brands [B, L]), once its lengths fit the tower.

  Categories and brands describe the same clicks and are summed, so their lengths L must agree; so
  must the ids' unless the tower pools them apart from the side info (`ids_apart`: then ids past the
  side info's length are clicks without side info, e.g. extra ids to exclude). Other lengths are
  INVALID_ARGUMENT naming each one. Unchecked, a length of 1 broadcast in the sum (one category sent
  beside two ids and brands was read as both clicks' category, answered without an error), and other
  lengths failed inside the tower ("Incompatible shapes: [1,2] vs. [1,3]", naming an internal op).
  """
  history = [features[name] for name in HISTORY]
  lengths = tf.stack([tf.shape(feature)[1] for feature in history])
  summed = lengths[1:] if ids_apart else lengths
  rule = "hist_categories and hist_brands" if ids_apart else "hist_ids, hist_categories and hist_brands"
  check = tf.debugging.Assert(
    tf.reduce_all(tf.equal(summed, summed[0])),
    [f"{rule} must hold one entry per past click each; the lengths (dimension 1) of {', '.join(HISTORY)} are", lengths],
    summarize=len(HISTORY),
    name="check_history",
  )
  with tf.control_dependencies([check]):
    return tuple(tf.identity(feature) for feature in history)


class QueryTower(Tower):
  """Encodes who is searching, what they typed and what they clicked into one normalised vector.

  The embedded query tokens are the attention target over the behaviour sequence; padding is masked.
  With `side_info="separate"` (the default), the id sequence and the side-info sequence (category +
  brand of each past click) are attended separately and added: for a long-tail ad whose id embedding
  is barely trained, the side-info path still carries the signal and the id path adds a residual on
  top of it, as Xiaohongshu describes for its search-ads recall. With `side_info="summed"`, each past
  click is embedded as id + category + brand and attended once. The user id, the profile, the query,
  the attended sequence and the sequence means are concatenated and passed through an MLP.

  Args:
    config: tower configuration.
    item_embedding: the item-feature embedding shared with the item tower.
    token_embedding: the token embedding shared with the item tower's bidwords.
  """

  def __init__(
    self, config: TowerConfig, item_embedding: ItemFeatureEmbedding, token_embedding: layers.HashedEmbedding, **kwargs
  ):
    super().__init__(config, **kwargs)
    dtype = config.precision
    self.item_embedding = item_embedding
    self.token_embedding = token_embedding
    if config.use_user_id:
      self.user_embedding = layers.HashedEmbedding(
        config.user_buckets, config.embedding_dim, dtype=dtype, name="user_id"
      )
    if config.sequence_encoder == "self_attention":
      self.sequence_encoder = layers.SequenceEncoder(
        config.sequence_layers,
        config.sequence_heads,
        config.max_history,
        dropout=config.sequence_dropout,
        dtype=dtype,
        name="sequence_encoder",
      )
    self.target_projection = tf.keras.layers.Dense(config.embedding_dim, dtype=dtype, name="target")
    self.attention = _attention(config, "target_attention")
    if config.side_info == "separate":
      self.side_attention = _attention(config, "side_attention")
    self.mlp = layers.mlp(config.hidden_units, config.output_dim, name="query_mlp", dtype=dtype)

  def lookup(self, features: dict[str, tf.Tensor]) -> Buckets:
    # The ids are pooled apart from the side info only by separate side info without the encoder.
    ids_apart = self.config.side_info == "separate" and self.config.sequence_encoder == "none"
    ids, categories, brands = self.item_embedding.lookup(*checked_history(features, ids_apart))
    buckets = {
      schema.USER_FEATURES: self.token_embedding.lookup(features[schema.USER_FEATURES]),
      schema.QUERY_TOKENS: self.token_embedding.lookup(features[schema.QUERY_TOKENS]),
      schema.HIST_IDS: ids,
      schema.HIST_CATEGORIES: categories,
      schema.HIST_BRANDS: brands,
    }
    if self.config.use_user_id:
      buckets[schema.USER_ID] = self.user_embedding.lookup(features[schema.USER_ID])
    return buckets

  def _pool(
    self, attention: tf.keras.layers.Layer, target: tf.Tensor | None, sequence: tf.Tensor, mask: tf.Tensor
  ) -> tf.Tensor:
    if self.config.sequence_pooling == "attention":
      return attention(target, sequence, mask)
    return layers.masked_mean(sequence, mask)

  def encode(self, buckets: Buckets, training: bool | None = None) -> tf.Tensor:
    # The user id is embedded first, as before it became optional: layers build (and draw their
    # initial weights) in call order, so default towers train to the same weights as before.
    inputs = [self.user_embedding.embed(buckets[schema.USER_ID])[0]] if self.config.use_user_id else []
    profile = layers.masked_mean(*self.token_embedding.embed(buckets[schema.USER_FEATURES]))
    query = layers.masked_mean(*self.token_embedding.embed(buckets[schema.QUERY_TOKENS]))
    inputs += [profile, query]
    sequence = [buckets[name] for name in (schema.HIST_IDS, schema.HIST_CATEGORIES, schema.HIST_BRANDS)]
    if self.config.sequence_encoder != "none":
      sequence = [s[:, : self.config.max_history] for s in sequence]  # The encoder's positions end there.
    ids, categories, brands, mask = self.item_embedding.embed(*sequence)
    target_input = query
    if self.config.sequence_encoder != "none":
      latest = self.sequence_encoder(ids + categories + brands, mask, training=training)[:, 0]
      inputs.append(latest)
      if self.config.attention_target == "query_and_latest":
        target_input = tf.concat([query, latest], axis=-1)
    # Mean pooling has no target: the projection is not even built, as in runs that predate it.
    target = self.target_projection(target_input) if self.config.sequence_pooling == "attention" else None
    if self.config.side_info == "summed":
      history = ids + categories + brands
      parts = [self._pool(self.attention, target, history, mask), layers.masked_mean(history, mask)]
    else:
      # A past click counts on the side-info path when any of its side info is known.
      side_mask = tf.logical_or(tf.not_equal(sequence[1], 0), tf.not_equal(sequence[2], 0))
      side = categories + brands
      side_pooled = self._pool(self.side_attention, target, side, side_mask)
      id_pooled = self._pool(self.attention, target, ids, mask)
      parts = [side_pooled + id_pooled, layers.masked_mean(side, side_mask), layers.masked_mean(ids, mask)]
    embedding = self.mlp(tf.concat([*inputs, *parts], axis=-1))
    return tf.math.l2_normalize(embedding, axis=-1)


class TextQueryTower(Tower):
  """Encodes only what the query says (its tokens): the semantic channel's query side.

  Nothing about who asks (user, profile, behaviour) enters, so the embedding stays about the query's
  meaning, which keeps what it recalls relevant to it and carries long-tail queries.

  Args:
    config: tower configuration.
    token_embedding: the token embedding shared with the item tower's bidwords.
  """

  def __init__(self, config: TowerConfig, token_embedding: layers.HashedEmbedding, **kwargs):
    super().__init__(config, **kwargs)
    self.token_embedding = token_embedding
    self.mlp = layers.mlp(config.hidden_units, config.output_dim, name="query_mlp", dtype=config.precision)

  def lookup(self, features: dict[str, tf.Tensor]) -> Buckets:
    return {schema.QUERY_TOKENS: self.token_embedding.lookup(features[schema.QUERY_TOKENS])}

  def encode(self, buckets: Buckets, training: bool | None = None) -> tf.Tensor:
    del training  # Same computation in training and serving.
    query = layers.masked_mean(*self.token_embedding.embed(buckets[schema.QUERY_TOKENS]))
    return tf.math.l2_normalize(self.mlp(query), axis=-1)


class ItemTower(Tower):
  """Encodes an ad from its hashed id and side info (category, brand, bidword tokens).

  With `features="text"` the id is left out: the ad is placed by what it says, as the query is.

  Args:
    config: tower configuration.
    item_embedding: the item-feature embedding shared with the query tower.
    token_embedding: the token embedding shared with the query tower.
  """

  def __init__(
    self, config: TowerConfig, item_embedding: ItemFeatureEmbedding, token_embedding: layers.HashedEmbedding, **kwargs
  ):
    super().__init__(config, **kwargs)
    self.item_embedding = item_embedding
    self.token_embedding = token_embedding
    self.mlp = layers.mlp(config.hidden_units, config.output_dim, name="item_mlp", dtype=config.precision)

  def lookup(self, features: dict[str, tf.Tensor]) -> Buckets:
    item = self.item_embedding
    buckets = {
      schema.CATEGORY: item.categories.lookup(features[schema.CATEGORY]),
      schema.BRAND: item.brands.lookup(features[schema.BRAND]),
      schema.AD_TOKENS: self.token_embedding.lookup(features[schema.AD_TOKENS]),
    }
    if self.config.features != "text":
      buckets[schema.AD_ID] = item.ids.lookup(features[schema.AD_ID])
    return buckets

  def encode(self, buckets: Buckets, training: bool | None = None) -> tf.Tensor:
    item = self.item_embedding
    parts = []
    # Id, category, brand: the order layers build in (and draw their initial weights), as before.
    if self.config.features != "text":
      ids, _ = item.ids.embed(buckets[schema.AD_ID])
      if training and self.config.id_dropout > 0:
        keep = tf.random.uniform([tf.shape(ids)[0], 1]) >= self.config.id_dropout
        ids = ids * tf.cast(keep, ids.dtype)
      parts.append(ids)
    parts += [item.categories.embed(buckets[schema.CATEGORY])[0], item.brands.embed(buckets[schema.BRAND])[0]]
    tokens = layers.masked_mean(*self.token_embedding.embed(buckets[schema.AD_TOKENS]))
    embedding = self.mlp(tf.concat([*parts, tokens], axis=-1))
    return tf.math.l2_normalize(embedding, axis=-1)


class IdTower(Tower):
  """One id embedding per user (query side) or per item: the TFRS basic tutorial's baseline model.

  Args:
    config: tower configuration (`output_dim` is the embedding width).
    feature: the id feature to embed, `schema.USER_ID` or `schema.AD_ID`.
    num_buckets: hash buckets of that id.
  """

  def __init__(self, config: TowerConfig, feature: str, num_buckets: int, **kwargs):
    super().__init__(config, **kwargs)
    self.feature = feature
    self.ids = layers.HashedEmbedding(num_buckets, config.output_dim, name=feature)

  def lookup(self, features: dict[str, tf.Tensor]) -> Buckets:
    return {self.feature: self.ids.lookup(features[self.feature])}

  def encode(self, buckets: Buckets, training: bool | None = None) -> tf.Tensor:
    del training  # Same computation in training and serving.
    embedding, _ = self.ids.embed(buckets[self.feature])
    return tf.math.l2_normalize(tf.cast(embedding, tf.float32), axis=-1)


def _attention(config: TowerConfig, name: str) -> tf.keras.layers.Layer:
  if config.attention == "din":
    return layers.MlpAttention(dtype=config.precision, name=name)
  return layers.TargetAttention(config.embedding_dim, dtype=config.precision, name=name)


def build_towers(config: TowerConfig) -> tuple[Tower, Tower]:
  """Creates the two towers with their shared embeddings."""
  if config.features == "ids_only":
    return (
      IdTower(config, schema.USER_ID, config.user_buckets, name="query_tower"),
      IdTower(config, schema.AD_ID, config.id_buckets, name="item_tower"),
    )
  item_embedding = ItemFeatureEmbedding(config, name="item_features")
  token_embedding = layers.HashedEmbedding(
    config.token_buckets, config.embedding_dim, dtype=config.precision, name="tokens"
  )
  if config.features == "text":
    query_tower: Tower = TextQueryTower(config, token_embedding, name="query_tower")
  else:
    query_tower = QueryTower(config, item_embedding, token_embedding, name="query_tower")
  return query_tower, ItemTower(config, item_embedding, token_embedding, name="item_tower")
