"""Keeps a model's signatures stable from one version to the next.

TF Serving moves every client to the newest version of a model (the default `latest` policy). A
version whose signatures take other inputs, or drop an output, breaks the clients of the previous
one the moment a server loads it; such a model belongs under a base path of its own. Added
signatures and added outputs break no one and pass.
"""

from __future__ import annotations

import os

import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

from engine import stock_ops


def read_signatures(saved_model_dir: str) -> dict[str, meta_graph_pb2.SignatureDef]:
  """The serving signatures of a SavedModel directory (its saved_model.pb), by name."""
  signatures = {}
  for meta_graph in stock_ops.read_saved_model(saved_model_dir).meta_graphs:
    if "serve" in meta_graph.meta_info_def.tags:
      signatures.update(meta_graph.signature_def)
  return {name: signature for name, signature in signatures.items() if not name.startswith("__")}


def _tensor(info: meta_graph_pb2.TensorInfo) -> str:
  if info.tensor_shape.unknown_rank:
    shape = "?"
  else:
    shape = "[" + ", ".join("None" if d.size < 0 else str(d.size) for d in info.tensor_shape.dim) + "]"
  return f"{tf.as_dtype(info.dtype).name}{shape}"


def breaking_changes(
  old: dict[str, meta_graph_pb2.SignatureDef], new: dict[str, meta_graph_pb2.SignatureDef]
) -> list[str]:
  """What a client of `old` would find broken in `new`, one line per change (empty: compatible)."""
  changes = []
  for name, before in sorted(old.items()):
    after = new.get(name)
    if after is None:
      changes.append(f"signature {name} removed")
      continue
    for alias in sorted(set(before.inputs) | set(after.inputs)):
      if alias not in after.inputs:
        changes.append(f"{name}: input {alias} removed")
      elif alias not in before.inputs:
        changes.append(f"{name}: input {alias} added ({_tensor(after.inputs[alias])})")
      elif _tensor(before.inputs[alias]) != _tensor(after.inputs[alias]):
        changes.append(f"{name}: input {alias} {_tensor(before.inputs[alias])} -> {_tensor(after.inputs[alias])}")
    for alias in sorted(before.outputs):
      if alias not in after.outputs:
        changes.append(f"{name}: output {alias} removed")
      elif after.outputs[alias].dtype != before.outputs[alias].dtype:
        changes.append(f"{name}: output {alias} {_tensor(before.outputs[alias])} -> {_tensor(after.outputs[alias])}")
  return changes


def check_compatible(new_dir: str, base_path: str, newest_version: int | None) -> None:
  """Raises ValueError if the SavedModel in `new_dir` would break the clients of `newest_version`.

  Args:
    new_dir: the version being published (its saved_model.pb written).
    base_path: the model's base path.
    newest_version: the newest complete version under it; None for the model's first version.
  """
  if newest_version is None:
    return
  changes = breaking_changes(read_signatures(os.path.join(base_path, str(newest_version))), read_signatures(new_dir))
  if changes:
    listed = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    raise ValueError(
      f"This export would break the clients of {base_path}: its signatures differ from version "
      f"{newest_version}'s ({listed}). Servers move every client to the newest version, so export it "
      "under a base path of its own, or pass --allow_signature_change if the clients are ready for it. "
      "Nothing was published."
    )
