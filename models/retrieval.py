"""The two-tower retrieval model trained with TFRS's in-batch softmax Retrieval task."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from models import towers
from models.config import TowerConfig
from models.data import schema


class RetrievalModel(tfrs.Model):
  """Query and item towers trained so that a query scores its clicked ad above the batch's others.

  The loss is TFRS's in-batch softmax (`tfrs.tasks.Retrieval`) with a temperature, and with
  accidental hits (the same ad twice in a batch, frequent under Zipf popularity) removed. Top-k
  accuracy over the whole catalog is computed separately by `models.evaluation`, against the item
  tower as it is at evaluation time.

  Args:
    config: tower configuration.
  """

  def __init__(self, config: TowerConfig):
    super().__init__()
    self.config = config
    self.query_tower, self.item_tower = towers.build_towers(config)
    self.task = tfrs.tasks.Retrieval(temperature=config.temperature, remove_accidental_hits=True)

  def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
    query_embeddings = self.query_tower(features)
    item_embeddings = self.item_tower(features)
    return self.task(query_embeddings, item_embeddings, candidate_ids=features[schema.AD_ID],
                     compute_metrics=False)


def example_signature() -> dict[str, tf.TensorSpec]:
  """tf.data signature of a batch of training examples (query + positive item features)."""
  return {name: schema.feature_spec(name) for name in schema.QUERY_FEATURE_NAMES + schema.ITEM_FEATURE_NAMES}


def build_towers_for_restore(config: TowerConfig) -> RetrievalModel:
  """A model whose variables exist, ready for `load_weights` (subclassed models build lazily)."""
  model = RetrievalModel(config)
  dummy = {name: tf.constant([[schema.PAD]] if spec.shape.rank == 2 else [schema.PAD])
           for name, spec in example_signature().items()}
  model.query_tower(dummy)
  model.item_tower(dummy)
  return model
