"""Top-k accuracy over the whole catalog with TFRS's FactorizedTopK metric (the TFRS protocol)."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from models import catalog as catalog_lib
from models.data import schema, sequences


def top_k_accuracy(query_tower: tf.keras.Model, item_tower: tf.keras.Model, table: sequences.ItemTable,
                   examples: Iterable[dict[str, np.ndarray]], ks: tuple[int, ...] = (1, 10, 50, 100)) -> dict[str, float]:
  """Share of examples whose clicked item is among the top k of the whole catalog, for each k.

  This is the metric the TFRS tutorials report ("factorized_top_k/top_100_categorical_accuracy").
  """
  catalog = catalog_lib.embed_catalog(item_tower, table)
  index = tfrs.layers.factorized_top_k.BruteForce(k=max(ks))
  index.index(tf.constant(catalog.embeddings), tf.constant(catalog.ids.astype(str)))
  metric = tfrs.metrics.FactorizedTopK(candidates=index, ks=ks)
  encode_query = tf.function(query_tower)
  encode_item = tf.function(item_tower)
  for batch in examples:
    tensors = {name: tf.constant(batch[name]) for name in schema.QUERY_FEATURE_NAMES + schema.ITEM_FEATURE_NAMES}
    metric.update_state(encode_query(tensors), encode_item(tensors), true_candidate_ids=tensors[schema.AD_ID])
  return {f"top_{k}": float(value.numpy()) for k, value in zip(ks, metric.result())}
