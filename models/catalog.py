"""Embeds a catalog with the item tower in one streaming pass: ids, embeddings and eligibility."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from models.data import schema, sequences


@dataclasses.dataclass
class EmbeddedCatalog:
  """The catalog as the index sees it.

  Attributes:
    ids: [N] ad ids (object array of str), row i of the index being ids[i].
    embeddings: float32 [N, d] item-tower outputs.
    eligible: bool [N], False for paused ads.
  """

  ids: np.ndarray
  embeddings: np.ndarray
  eligible: np.ndarray


def embed_catalog(item_tower: tf.keras.Model, table: sequences.ItemTable, batch_size: int = 65536) -> EmbeddedCatalog:
  """Runs the item tower over every catalog row, one batch at a time."""
  encode = tf.function(item_tower)
  ids, embeddings, eligible = [], [], []
  for _, features in sequences.iterate_catalog(table, batch_size):
    ids.append(features[schema.AD_ID])
    eligible.append(features[schema.STATUS] == "active")
    embeddings.append(encode({name: tf.constant(features[name]) for name in schema.ITEM_FEATURE_NAMES}).numpy())
  return EmbeddedCatalog(
    ids=np.concatenate(ids), embeddings=np.concatenate(embeddings).astype(np.float32), eligible=np.concatenate(eligible)
  )
