"""A version's variables checkpoint, rewritten under the previous version's graph.

A refresh that changes only variable values (eligibility, or an index updated from N's training)
need not trace anything: the new version is N's saved_model.pb, hard-linked, with a new checkpoint.
Servers then see the same graph file and reuse the graph they imported for N (fgr-serve does; TF
Serving loads it like any version). This works where N's graph saved the changed variables with
shapes the new values fit: `engine.base.catalog_variable` saves catalog-sized ones with unknown rows.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from engine import base, full_graph, stock_ops
from engine import cooccurrence as cooccurrence_lib
from export import refresh_policy, refresh_state, version_files

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VARIABLE_VALUE = "VARIABLE_VALUE"

Value = np.ndarray | tf.Tensor | tf.Variable


def _shape_and_dtype(value: np.ndarray | tf.Tensor) -> tuple[tf.TensorShape, tf.DType]:
  if isinstance(value, np.ndarray):
    return tf.TensorShape(value.shape), tf.string if value.dtype.kind in "OSU" else tf.as_dtype(value.dtype)
  return value.shape, value.dtype


def rewrite_checkpoint(
  source_prefix: str, destination_prefix: str, replacements: Mapping[str, Value], resizable: Collection[str] = ()
) -> None:
  """Writes a copy of a TF checkpoint with some tensors replaced.

  A replacement keeps its tensor's dtype and shape; keys in `resizable` may change the number of rows
  (the first dimension). The tensors are read with RestoreV2 and written with SaveV2, so they stay TF
  tensors throughout: no NumPy copy of the string tensors, which is the slow part at catalog scale.
  """
  reader = tf.train.load_checkpoint(source_prefix)
  dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
  replacements = {
    name: value.read_value() if isinstance(value, tf.Variable) else value for name, value in replacements.items()
  }
  for name, value in replacements.items():
    if name not in dtypes:
      raise KeyError(f"{source_prefix} has no tensor {name!r}")
    shape, dtype = _shape_and_dtype(value)
    expected = tf.TensorShape(shapes[name])
    if name in resizable and expected.rank:
      expected = tf.TensorShape([None]).concatenate(expected[1:])
    if not expected.is_compatible_with(shape) or dtypes[name] != dtype:
      raise ValueError(f"{name}: expected {dtypes[name].name} {expected}, got {dtype.name} {shape}")
  names = sorted(dtypes)
  kept = [n for n in names if n not in replacements]
  restored = dict(
    zip(
      kept,
      tf.raw_ops.RestoreV2(
        prefix=source_prefix, tensor_names=kept, shape_and_slices=[""] * len(kept), dtypes=[dtypes[n] for n in kept]
      )
      if kept
      else [],
    )
  )
  tensors = [restored[n] if n in restored else tf.convert_to_tensor(replacements[n]) for n in names]
  os.makedirs(os.path.dirname(destination_prefix), exist_ok=True)
  tf.raw_ops.SaveV2(prefix=destination_prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)


def write_fingerprint(saved_model_dir: str) -> None:
  """Writes fingerprint.pb for a SavedModel assembled by hand (it hashes the checkpoint too)."""
  from tensorflow.python.saved_model import fingerprinting_utils  # pylint: disable=g-import-not-at-top

  fingerprinting_utils.write_fingerprint(saved_model_dir)


def _node_ids(nodes, paths: Collection[str]) -> dict[str, int]:
  """Node id of each object path ("index/eligible") from the root (node 0) by child names."""
  ids = {}
  for path in paths:
    node = 0
    for name in path.split("/"):
      children = {child.local_name: child.node_id for child in nodes[node].children}
      if name not in children:
        break
      node = children[name]
    else:
      ids[path] = node
  return ids


def variable_keys(prefix: str, paths: Collection[str]) -> dict[str, str]:
  """The checkpoint key of each variable at an object path (a variable shared by two objects is saved
  once, under one of their paths); paths without a saved variable are left out."""
  graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
    tf.train.load_checkpoint(prefix).get_tensor(OBJECT_GRAPH_KEY)
  )
  keys = {}
  for path, node in _node_ids(graph.nodes, paths).items():
    for attribute in graph.nodes[node].attributes:
      if attribute.name == _VARIABLE_VALUE:
        keys[path] = attribute.checkpoint_key
  return keys


def saved_variable_shapes(saved_model_dir: str, paths: Collection[str]) -> dict[str, tf.TensorShape]:
  """The shape each variable at an object path was saved with in the SavedModel's graph."""
  nodes = stock_ops.read_saved_model(saved_model_dir).meta_graphs[0].object_graph_def.nodes
  return {
    path: tf.TensorShape(nodes[node].variable.shape)
    for path, node in _node_ids(nodes, paths).items()
    if nodes[node].WhichOneof("kind") == "variable"
  }


def graph_replacements(
  source: refresh_state.Source, index: base.Index, state: refresh_state.CatalogState
) -> tuple[dict[str, Value] | None, str | None]:
  """The checkpoint tensors under which N's graph serves `index` over `state`, or (None, why not).

  N's serving functions read the catalog (ids, eligibility, the index's catalog-sized state) from
  variables and bake in only k and the search knobs, so when the index says its graph fits
  (`Index.graph_reuse_blocker`) and N saved the catalog variables with unknown rows
  (`engine.base.catalog_variable`), a new checkpoint is the whole new version.
  """
  k = source.report.k
  # The graph asks its index for k plus the exclusion depth, capped at the catalog it was traced for; N's
  # catalog gives that depth (a reused graph is reused only at the same depth). Another depth would ask
  # more candidates than a shrunk catalog holds (every request failing in top_k) or fewer than excluded.
  depth = refresh_policy.index_k(source.report, index.num_items)
  saved_depth = refresh_policy.index_k(source.report, len(source.state.ids))
  if depth != saved_depth:
    return None, f"the graph searches {saved_depth} candidates, and {index.num_items} items give {depth}"
  reason = index.graph_reuse_blocker(source.report.index_config, depth, len(source.state.ids))
  if reason is not None:
    return None, reason
  if index.num_items < k:
    return None, f"{index.num_items} items, fewer than k={k}"
  values, optional = full_graph.catalog_values(index, state.ids, with_cooccurrence=bool(source.report.cooccurrence))
  return checkpoint_replacements(source.path, source.version, values, optional, full_graph.CATALOG_PREFIXES)


def saved_fusion(source: refresh_state.Source, item_ids: np.ndarray) -> dict[str, Any]:
  """The FullGraph arguments (`cooccurrence`, `fusion_weight`) that fuse N's channel over the catalog `item_ids`.

  Empty when N fuses none. The table is fit on the training log, which a catalog refresh does not
  change, so a retraced graph carries N's table (as N's checkpoint saved it) as it is.
  """
  config = source.report.cooccurrence
  if not config:
    return {}
  prefix = version_files.variables_prefix(source.path)
  paths = {name: f"{full_graph.COOCCURRENCE}/{name}" for name in cooccurrence_lib.TABLE_PATHS}
  keys = variable_keys(prefix, paths.values())
  if set(keys) != set(paths.values()):
    raise ValueError(f"version {source.version}'s report names a co-occurrence channel its checkpoint lacks")
  reader = tf.train.load_checkpoint(prefix)
  table = cooccurrence_lib.NeighbourTable(**{name: reader.get_tensor(keys[path]) for name, path in paths.items()})
  channel = cooccurrence_lib.CooccurrenceChannel(
    table, item_ids, config["history_feature"], history=config["history"], decay=config["decay"]
  )
  return {"cooccurrence": channel, "fusion_weight": config["fusion_weight"]}


def checkpoint_replacements(
  version_path: str,
  version: int,
  values: dict[str, Value],
  optional: Collection[str],
  catalog_prefixes: tuple[str, ...],
) -> tuple[dict[str, Value] | None, str | None]:
  """The checkpoint tensors that put `values` (by object path) in place of a version's catalog, or (None, why not).

  The version's graph serves them when it saved a variable at each path (those in `optional` may be
  missing, and are then left out) with a shape they fit, and no other catalog variable: every
  checkpoint key under `catalog_prefixes` must be one that `values` replaces.
  """
  values = dict(values)
  prefix = version_files.variables_prefix(version_path)
  keys = variable_keys(prefix, values)
  for path in set(optional) - set(keys):
    values.pop(path, None)
  shapes = saved_variable_shapes(version_path, values)
  catalog_keys = {
    key for key in tf.train.load_checkpoint(prefix).get_variable_to_shape_map() if key.startswith(catalog_prefixes)
  }
  if set(keys) != set(values) or set(shapes) != set(values) or set(keys.values()) != catalog_keys:
    return None, f"version {version}'s index variables are not this index's"
  for path, value in values.items():
    if not shapes[path].is_compatible_with(np.shape(value) if isinstance(value, np.ndarray) else value.shape):
      return None, f"version {version}'s graph saved {path} with shape {shapes[path]}"
  return {keys[path]: value for path, value in values.items()}, None
