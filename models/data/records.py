"""tf.train.Example codec of example and catalog batches: what fgr-prepare writes and tf.data parses.

A batch is a dict of equal-length arrays, as every source yields them (`sources.Source.examples`):
string features of shape [n] or [n, L] (padded with `schema.PAD`), plus optional numeric or string
extras of shape [n] (a click's day, whether it converted). A `Layout` names each column's width and
kind; it is stored in the manifest, so readers parse fixed-length features without looking inside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

SCALAR = 0  # Width of a [n] column.
KINDS = ("bytes", "int64", "float")
_NUMPY_OF_KIND = {"bytes": object, "int64": np.int64, "float": np.float32}
_TF_OF_KIND = {"bytes": tf.string, "int64": tf.int64, "float": tf.float32}


@dataclasses.dataclass
class Layout:
  """Columns of a record: name -> (width, kind); width SCALAR for [n], L for [n, L]."""

  columns: dict[str, tuple[int, str]]

  @classmethod
  def of_batch(cls, batch: dict[str, np.ndarray]) -> Layout:
    """The layout a batch has: its widths, and each column's kind from its dtype."""
    columns = {}
    for name, values in batch.items():
      values = np.asarray(values)
      if values.ndim not in (1, 2):
        raise ValueError(f"Column {name!r} has shape {values.shape}; records hold [n] or [n, L] columns")
      columns[name] = (SCALAR if values.ndim == 1 else values.shape[1], _kind(name, values))
    return cls(columns)

  def check(self, batch: dict[str, np.ndarray]) -> None:
    """Raises if a later batch of the stream has other columns, widths or kinds than the first."""
    other = Layout.of_batch(batch)
    if other.columns != self.columns:
      raise ValueError(f"A batch changed layout mid-stream: {other.columns} after {self.columns}")

  def parse_spec(self, names: tuple[str, ...] | None = None) -> dict[str, tf.io.FixedLenFeature]:
    """`tf.io.parse_example` features of the named columns (all by default)."""
    names = tuple(self.columns) if names is None else names
    missing = [name for name in names if name not in self.columns]
    if missing:
      raise ValueError(f"Records have no column {missing}; they have {sorted(self.columns)}")
    return {
      name: tf.io.FixedLenFeature([] if width == SCALAR else [width], _TF_OF_KIND[kind])
      for name, (width, kind) in ((name, self.columns[name]) for name in names)
    }

  def to_json(self) -> dict[str, Any]:
    return {name: {"width": width, "kind": kind} for name, (width, kind) in self.columns.items()}

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> Layout:
    return cls({name: (int(column["width"]), column["kind"]) for name, column in value.items()})


def _kind(name: str, values: np.ndarray) -> str:
  if values.dtype == object or values.dtype.kind in "SU":
    return "bytes"
  if values.dtype.kind in "biu":
    return "int64"
  if values.dtype.kind == "f":
    return "float"
  raise ValueError(f"Column {name!r} has dtype {values.dtype}; records hold strings, integers or floats")


def encode(batch: dict[str, np.ndarray], layout: Layout) -> Iterator[bytes]:
  """Serialized tf.train.Examples, one per row of the batch."""
  columns = {}
  for name, (_, kind) in layout.columns.items():
    values = np.asarray(batch[name])
    if kind == "bytes":
      flat = [value.encode() if isinstance(value, str) else bytes(value) for value in values.ravel().tolist()]
      values = np.asarray(flat, dtype=object).reshape(values.shape)
    columns[name] = (kind, values)
  rows = len(next(iter(batch.values())))
  for row in range(rows):
    example = tf.train.Example()
    feature = example.features.feature
    for name, (kind, values) in columns.items():
      value = values[row]
      value = value.tolist() if isinstance(value, np.ndarray) else [value.item() if kind != "bytes" else value]
      if kind == "bytes":
        feature[name].bytes_list.value.extend(value)
      elif kind == "int64":
        feature[name].int64_list.value.extend(int(v) for v in value)
      else:
        feature[name].float_list.value.extend(value)
    # Deterministic: the feature map is otherwise serialized in an order that differs from process to
    # process, and fgr-prepare promises the same shards byte for byte from the same input.
    yield example.SerializeToString(deterministic=True)


def parse(serialized: tf.Tensor, layout: Layout, names: tuple[str, ...] | None = None) -> dict[str, tf.Tensor]:
  """Parses a [n] batch of serialized Examples into the named columns (vectorised, in the graph)."""
  return tf.io.parse_example(serialized, layout.parse_spec(names))


def parser(layout: Layout, names: tuple[str, ...] | None = None) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
  """`parse` as a tf.data map function (straight-line graph code: nothing for AutoGraph to convert)."""

  @tf.autograph.experimental.do_not_convert
  def parse_batch(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    return parse(serialized, layout, names)

  return parse_batch


def to_numpy(parsed: dict[str, tf.Tensor], layout: Layout) -> dict[str, np.ndarray]:
  """Parsed columns as the sources yield them: str object arrays for strings, native dtypes otherwise."""
  out = {}
  for name, tensor in parsed.items():
    values = tensor.numpy() if hasattr(tensor, "numpy") else tensor
    if layout.columns[name][1] == "bytes":
      flat = [value.decode() for value in values.ravel().tolist()]
      values = np.asarray(flat, dtype=object).reshape(values.shape)
    else:
      values = values.astype(_NUMPY_OF_KIND[layout.columns[name][1]])
    out[name] = values
  return out
