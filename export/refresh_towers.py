"""A version's towers, restored from its SavedModel, to embed new ads and to save with the next version."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from engine import full_graph

EMBED_BATCH_SIZE = 8192
DEFAULT_OUTPUT = "embedding"  # The encode signatures' output of a single-index version.


class RestoredTower(tf.Module):
  """One tower of a loaded version, called through that version's encode function.

  The function was traced when the towers were exported; calling it from a new tf.function embeds it
  as a function call, so the tower is not traced again and its variables are the exported ones.
  Both are saved with the new version (`owner` holds the variables, `encode` the function), so a
  refresh of that version calls the same function again instead of wrapping a wrapper.

  Args:
    owner: the restored tower object holding the tower's variables.
    encode: the exported encode function (features as keyword arguments -> {output: [B, d]}).
    name: module name.
    output: the encode function's output that is this tower's embedding (a channel graph's encode
      functions return one per channel, `embeddings_<channel>`).
  """

  def __init__(
    self, owner: tf.Module, encode: Callable[..., dict[str, tf.Tensor]], name: str, output: str = DEFAULT_OUTPUT
  ):
    super().__init__(name=name)
    self.owner = owner
    self.encode = encode
    self.output = output

  @classmethod
  def from_loaded(
    cls,
    loaded_tower: Any,
    signature: Callable[..., dict[str, tf.Tensor]],
    name: str,
    output: str = DEFAULT_OUTPUT,
  ) -> RestoredTower:
    """The tower of a loaded version: unwraps one saved by a refresh, else calls the version's signature."""
    if hasattr(loaded_tower, "owner") and hasattr(loaded_tower, "encode"):
      return cls(loaded_tower.owner, loaded_tower.encode, name, output)
    return cls(loaded_tower, signature, name, output)

  def __call__(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
    return self.encode(**features)[self.output]


@dataclasses.dataclass
class LoadedTowers:
  """A version's towers, restored once and reused for every later version built from them."""

  query_tower: RestoredTower
  item_tower: RestoredTower
  query_specs: dict[str, tf.TensorSpec]
  item_specs: dict[str, tf.TensorSpec]
  encode_item: Callable[..., dict[str, tf.Tensor]]
  encode_query: Callable[..., dict[str, tf.Tensor]]

  @classmethod
  def load(cls, version_path: str) -> LoadedTowers:
    loaded = tf.saved_model.load(version_path)
    encode_query = loaded.signatures[full_graph.ENCODE_QUERY]
    encode_item = loaded.signatures[full_graph.ENCODE_ITEM]
    return cls(
      query_tower=RestoredTower.from_loaded(loaded.query_tower, encode_query, "query_tower"),
      item_tower=RestoredTower.from_loaded(loaded.item_tower, encode_item, "item_tower"),
      query_specs=dict(encode_query.structured_input_signature[1]),
      item_specs=dict(encode_item.structured_input_signature[1]),
      encode_item=encode_item,
      encode_query=encode_query,
    )

  def embed_items(self, features: dict[str, np.ndarray]) -> np.ndarray:
    """float32 [B, d] embeddings of raw item features, in batches."""
    count = len(features[next(iter(features))])
    parts = [np.zeros([0, 0], np.float32)]
    for start in range(0, count, EMBED_BATCH_SIZE):
      batch = {name: tf.constant(values[start : start + EMBED_BATCH_SIZE]) for name, values in features.items()}
      parts.append(self.encode_item(**batch)["embedding"].numpy())
    return np.concatenate(parts[1:]) if count else parts[0]
