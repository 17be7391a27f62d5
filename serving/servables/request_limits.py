"""Request-expansion limits: the elements and bytes a request may expand to.

A TensorProto may declare a larger shape than the values it carries: TF fills
the rest with its last value (or zeros), so `shape: [100000, 50]` with one
`string_val` is a 30-byte request that expands to 5M strings. A tf.Example
list with a context repeats the context in every example. Memory freed after
such a request stays in the process (fgr-serve keeps freed memory for the next
version, --retain_freed_memory), so one request can leave the server
gigabytes larger. This module prices a request from what it declares (shapes,
value counts, byte lengths), before anything is decoded, against limits that
default to what the signature can use:

  elements: for each input, its static shape per row (unknown inner
    dimensions count UNKNOWN_INNER_ELEMENTS per row together) times a row
    bound (--expansion_limit_rows per request, max_batch_size per batch);
  bytes: those elements times the dtype's size (strings count
    STRING_ELEMENT_BYTES each), but never below MIN_DERIVED_BYTES, the default
    gRPC/REST message limit: what may arrive unexpanded may also arrive
    expanded.

Requests over a limit fail with RESOURCE_EXHAUSTED (HTTP 413 over REST, as
for --rest_api_max_body_bytes: the same request can never fit, so TF
Serving's "retry later" 429 would mislead); malformed ones (negative
dimensions, a tensor_content of the wrong length) with INVALID_ARGUMENT.
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import input_pb2

from serving import errors
from serving.servables import tensor_util

# Rows per request the derived per-request limits allow (--expansion_limit_rows).
DEFAULT_ROWS = 4096
# Elements per row that an input's unknown inner dimensions count for together.
UNKNOWN_INNER_ELEMENTS = 256
# Bytes each string element counts for in the derived byte limits.
STRING_ELEMENT_BYTES = 1024
# Derived byte limits never go below the default gRPC/REST message limit.
MIN_DERIVED_BYTES = 64 << 20
# REST answers 413 (Payload Too Large), not 429: see the module docstring.
HTTP_STATUS = 413


# Bytes per element of each dtype a request may carry (strings: see below).
_DTYPE_SIZE = {dtype: tf.as_dtype(dtype).size for dtype in tensor_util.VALUE_FIELDS if dtype != types_pb2.DT_STRING}


class Cost(NamedTuple):
  """What one input (or a whole request) expands to."""

  elements: int
  nbytes: int


def _element_size(dtype: int) -> int:
  if dtype == types_pb2.DT_STRING:
    return STRING_ELEMENT_BYTES
  try:
    return max(1, tf.as_dtype(dtype).size)
  except (TypeError, ValueError):
    return 8


def tensor_cost(proto: tensor_pb2.TensorProto, alias: str) -> Cost | None:
  """Prices a request TensorProto from its declared shape and value counts.

  Nothing is decoded: strings count their encoded length (the proto's
  ByteSize) plus, for each element TF would fill, the last string's length.

  Returns:
    The cost, or None for dtypes left for decoding to reject.

  Raises:
    ServingError: INVALID_ARGUMENT for shapes TF rejects (unknown rank,
      negative dimensions), declared shapes decoding never fills in
      (tensor_util.MAX_FILLED_ELEMENTS) and a tensor_content whose length
      doesn't match the shape.
  """
  if proto.dtype not in tensor_util.VALUE_FIELDS:
    return None
  _, elements = tensor_util.declared_shape(proto, alias)
  if proto.dtype == types_pb2.DT_STRING:
    values = proto.string_val
    filled = elements - len(values)
    last = len(values[-1]) if values and filled > 0 else 0
    return Cost(elements, proto.ByteSize() + max(0, filled) * last)
  size = _DTYPE_SIZE[proto.dtype]
  if proto.tensor_content and len(proto.tensor_content) != elements * size:
    raise errors.invalid_argument(
      f"tensor parsing error: {alias}: tensor_content holds "
      f"{len(proto.tensor_content)} bytes, not {elements} "
      f"{tensor_util.dtype_name(proto.dtype)} values"
    )
  return Cost(elements, elements * size)


def examples_cost(model_input: input_pb2.Input) -> Cost:
  """Prices a Classify/Regress/MultiInference input: one string per example,
  each with the context's bytes in front (as input_util feeds them)."""
  kind = model_input.WhichOneof("kind")
  if kind == "example_list":
    examples = model_input.example_list
    return Cost(len(examples.examples), examples.ByteSize())
  if kind == "example_list_with_context":
    with_context = model_input.example_list_with_context
    count = len(with_context.examples)
    context = with_context.context.ByteSize()
    return Cost(count, with_context.ByteSize() - context + count * context)
  return Cost(0, 0)


def input_budget(info: meta_graph_pb2.TensorInfo, rows: int) -> Cost:
  """What one signature input can use with `rows` rows (see module doc)."""
  if info.tensor_shape.unknown_rank or not info.HasField("tensor_shape"):
    elements = rows * UNKNOWN_INNER_ELEMENTS
  else:
    dims = [d.size for d in info.tensor_shape.dim]
    if not dims:
      elements = 1
    else:
      inner, unknown = 1, False
      for d in dims[1:]:
        if d < 0:
          unknown = True
        else:
          inner *= d
      if unknown:
        inner *= UNKNOWN_INNER_ELEMENTS
      elements = (dims[0] if dims[0] >= 0 else rows) * inner
  return Cost(elements, elements * _element_size(info.dtype))


def _total(costs: Iterable[Cost]) -> Cost:
  elements = nbytes = 0
  for cost in costs:
    elements += cost.elements
    nbytes += cost.nbytes
  return Cost(elements, nbytes)


def _limit(configured: int, derived: int) -> int | None:
  """A flag's limit: > 0 as set, 0 derived, < 0 none (None)."""
  if configured < 0:
    return None
  return configured or derived


@dataclasses.dataclass(frozen=True)
class ExpansionLimits:
  """Bounds on what requests and batches expand to (fgr-serve's own flags).

  Each limit: > 0 is the limit, 0 derives it from the signature (see the
  module docstring), < 0 turns it off.

  Attributes:
    max_elements_per_request: --max_elements_per_request.
    max_bytes_per_request: --max_bytes_per_request.
    max_elements_per_batch: --max_elements_per_batch (server-side batching).
    max_bytes_per_batch: --max_bytes_per_batch.
    rows: Rows the derived per-request limits allow (--expansion_limit_rows).
  """

  max_elements_per_request: int = 0
  max_bytes_per_request: int = 0
  max_elements_per_batch: int = 0
  max_bytes_per_batch: int = 0
  rows: int = DEFAULT_ROWS

  def request_limits(self, signature: meta_graph_pb2.SignatureDef) -> tuple[int | None, int | None]:
    """(elements, bytes) one request on `signature` may expand to."""
    budget = _total(input_budget(info, max(1, self.rows)) for info in signature.inputs.values())
    return (
      _limit(self.max_elements_per_request, budget.elements),
      _limit(self.max_bytes_per_request, max(budget.nbytes, MIN_DERIVED_BYTES)),
    )

  def check(self, costs: Mapping[str, Cost], limits: tuple[int | None, int | None], context: str) -> None:
    """Raises RESOURCE_EXHAUSTED if `costs` (by input alias) exceed
    `limits` (a signature's `request_limits`); `context` names the servable
    and signature."""
    total = _total(costs.values())
    # (field of Cost, unit, flag, its configured value), elements first.
    measures = (
      (0, "elements", "--max_elements_per_request", self.max_elements_per_request),
      (1, "bytes", "--max_bytes_per_request", self.max_bytes_per_request),
    )
    over = [
      (field, unit, flag, configured, limit)
      for (field, unit, flag, configured), limit in zip(measures, limits)
      if limit is not None and total[field] > limit
    ]
    if not over:
      return
    field, unit, flag, configured, limit = over[0]
    amount = total[field]
    largest = max(costs, key=lambda alias: costs[alias][field])
    how = (
      ""
      if configured
      else (f", derived from the signature's input shapes at {self.rows} rows (--expansion_limit_rows)")
    )
    raise errors.resource_exhausted(
      f"Request expands to {amount} {unit} (largest input: {largest}), "
      f"over the limit of {limit} {unit} per request{how}; raise {flag} "
      "to allow it",
      http_status=HTTP_STATUS,
    ).with_context(context)

  def batch_budget(
    self, signature_defs: Mapping[str, meta_graph_pb2.SignatureDef], max_batch_size: int
  ) -> Callable[[Iterable[str]], tuple[int | None, int | None]]:
    """Returns feed tensor names -> (elements, bytes) one batch may hold.

    Derived limits price the feeds' signature inputs at `max_batch_size`
    rows; feeds no signature names count as unknown shapes.
    """
    infos = {}
    for signature in signature_defs.values():
      for info in signature.inputs.values():
        infos.setdefault(info.name, info)

    def budget(feed_names: Iterable[str]) -> tuple[int | None, int | None]:
      unknown = meta_graph_pb2.TensorInfo()
      unknown.tensor_shape.unknown_rank = True
      derived = _total(input_budget(infos.get(name, unknown), max_batch_size) for name in feed_names)
      return (
        _limit(self.max_elements_per_batch, derived.elements),
        _limit(self.max_bytes_per_batch, max(derived.nbytes, MIN_DERIVED_BYTES)),
      )

    return budget
