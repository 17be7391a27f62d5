"""The query tower and the item (ad) tower of the two-tower retrieval model.

Retrieval is factorised into two towers so that the catalog side can be computed ahead of time and
indexed: relevance is the dot product of a query embedding and an item embedding, both L2-normalised.
The towers share the item-feature and token embeddings, so a behaviour sequence, a query and an ad
speak the same vocabulary, and an ad never seen in training still gets a vector from its side info.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from models import layers
from models.config import TowerConfig
from models.data import schema


class ItemFeatureEmbedding(tf.keras.layers.Layer):
  """Embeds an item's id, category and brand; shared by the item tower and the behaviour sequence.

  Args:
    config: tower configuration.
  """

  def __init__(self, config: TowerConfig, **kwargs):
    super().__init__(**kwargs)
    self.ids = layers.HashedEmbedding(config.id_buckets, config.embedding_dim, name="ad_id")
    self.categories = layers.HashedEmbedding(config.side_buckets, config.embedding_dim, name="category")
    self.brands = layers.HashedEmbedding(config.side_buckets, config.embedding_dim, name="brand")

  def call(self, ad_ids: tf.Tensor, categories: tf.Tensor, brands: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """Returns (id, category, brand) embeddings and the id mask."""
    id_embedding, mask = self.ids(ad_ids)
    category_embedding, _ = self.categories(categories)
    brand_embedding, _ = self.brands(brands)
    return id_embedding, category_embedding, brand_embedding, mask


class QueryTower(tf.keras.Model):
  """Encodes who is searching, what they typed and what they clicked into one normalised vector.

  The embedded query tokens are the attention target over the behaviour sequence (each past click
  embedded as id + category + brand); padding is masked. The user id, the profile, the query, the
  attended sequence and its mean are concatenated and passed through an MLP.

  Args:
    config: tower configuration.
    item_embedding: the item-feature embedding shared with the item tower.
    token_embedding: the token embedding shared with the item tower's bidwords.
  """

  def __init__(self, config: TowerConfig, item_embedding: ItemFeatureEmbedding,
               token_embedding: layers.HashedEmbedding, **kwargs):
    super().__init__(**kwargs)
    self.config = config
    self.item_embedding = item_embedding
    self.token_embedding = token_embedding
    self.user_embedding = layers.HashedEmbedding(config.user_buckets, config.embedding_dim, name="user_id")
    self.target_projection = tf.keras.layers.Dense(config.embedding_dim, name="target")
    self.attention = layers.TargetAttention(config.embedding_dim, name="target_attention")
    self.mlp = layers.mlp(config.hidden_units, config.output_dim, name="query_mlp")

  def get_config(self) -> dict:
    return {"tower_config": dataclasses.asdict(self.config)}

  def call(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
    user, _ = self.user_embedding(features[schema.USER_ID])
    profile = layers.masked_mean(*self.token_embedding(features[schema.USER_FEATURES]))
    query = layers.masked_mean(*self.token_embedding(features[schema.QUERY_TOKENS]))
    ids, categories, brands, mask = self.item_embedding(
        features[schema.HIST_IDS], features[schema.HIST_CATEGORIES], features[schema.HIST_BRANDS])
    history = ids + categories + brands
    if self.config.sequence_pooling == "attention":
      pooled = self.attention(self.target_projection(query), history, mask)
    else:
      pooled = layers.masked_mean(history, mask)
    history_mean = layers.masked_mean(history, mask)
    embedding = self.mlp(tf.concat([user, profile, query, pooled, history_mean], axis=-1))
    return tf.math.l2_normalize(embedding, axis=-1)


class ItemTower(tf.keras.Model):
  """Encodes an ad from its hashed id and side info (category, brand, bidword tokens).

  Args:
    config: tower configuration.
    item_embedding: the item-feature embedding shared with the query tower.
    token_embedding: the token embedding shared with the query tower.
  """

  def __init__(self, config: TowerConfig, item_embedding: ItemFeatureEmbedding,
               token_embedding: layers.HashedEmbedding, **kwargs):
    super().__init__(**kwargs)
    self.config = config
    self.item_embedding = item_embedding
    self.token_embedding = token_embedding
    self.mlp = layers.mlp(config.hidden_units, config.output_dim, name="item_mlp")

  def get_config(self) -> dict:
    return {"tower_config": dataclasses.asdict(self.config)}

  def call(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
    ids, categories, brands, _ = self.item_embedding(
        features[schema.AD_ID], features[schema.CATEGORY], features[schema.BRAND])
    tokens = layers.masked_mean(*self.token_embedding(features[schema.AD_TOKENS]))
    embedding = self.mlp(tf.concat([ids, categories, brands, tokens], axis=-1))
    return tf.math.l2_normalize(embedding, axis=-1)


def build_towers(config: TowerConfig) -> tuple[QueryTower, ItemTower]:
  """Creates the two towers with their shared embeddings."""
  item_embedding = ItemFeatureEmbedding(config, name="item_features")
  token_embedding = layers.HashedEmbedding(config.token_buckets, config.embedding_dim, name="tokens")
  return (QueryTower(config, item_embedding, token_embedding, name="query_tower"),
          ItemTower(config, item_embedding, token_embedding, name="item_tower"))
