"""Session runs without `tf.compat.v1.Session.run`'s per-call Python.

`Session.run` normalises its feeds and fetches in Python on every call. It
resolves each feed_dict key to a tensor, converts and shape-checks each value,
and builds fetch mappers. Before every run it also asks the C API to extend
the session from its graph, which takes that graph's lock. fgr-serve calls a
few feed/fetch combinations per version again and again, and the versions of
an index refresh share one graph. So the work is done once per combination
here, and each call goes straight to `TF_SessionRun`, as TF Serving's C++
`Session::Run` does. The session must already hold the graph: `extend` does
that once, after the load.

TensorFlow has no public Python API for this. The private calls used here
(`Session._call_tf_sessionrun` and `_extend_graph`, `Tensor._as_tf_output`)
are the ones `Session.run` itself makes, on the pinned TF 2.20.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.client import pywrap_tf_session

from serving import errors
from serving.servables import tensor_util

# Feed/fetch combinations remembered per session; odd requests beyond this run
# without a cached plan (correct, only slower).
MAX_PLANS = 256


@dataclasses.dataclass(frozen=True)
class _Feed:
  name: str
  output: Any  # The C API's TF_Output.
  dtype: np.dtype
  dims: tuple[int, ...] | None  # -1 for unknown; None: unknown rank.


@dataclasses.dataclass(frozen=True)
class _Plan:
  feeds: tuple[_Feed, ...]
  fetches: list[Any]  # TF_Outputs of the fetches that are not fed.
  # Per fetch: its index among `fetches`, or the name of the feed it answers
  # with (the C API rejects a tensor both fed and fetched; Session.run
  # returns the fed value).
  sources: tuple[Any, ...]


class DirectSession:
  """Runs feeds and fetches named by tensor name on a session.

  Args:
    session: An open session whose graph is finalized.
  """

  def __init__(self, session: tf.compat.v1.Session):
    self._session = session
    self._plans: dict[tuple[tuple[str, ...], tuple[str, ...]], _Plan] = {}

  def extend(self) -> None:
    """Copies the graph into the session if a run has not done it yet."""
    self._session._extend_graph()  # pylint: disable=protected-access

  def run(
    self, feeds: Mapping[str, Any], fetches: Sequence[str], options: config_pb2.RunOptions | None = None
  ) -> list[np.ndarray]:
    """Like `Session.run(list(fetches), feed_dict=feeds, options=options)`.

    Raises:
      errors.ServingError: INVALID_ARGUMENT when a feed does not fit its tensor's shape or cannot be
        fed, or a name is not a tensor of the graph (a signature may name an op, e.g. the
        `__saved_model_init_op` signature): the request asked for what the graph cannot run.
      tf.errors.OpError: The run failed.
      errors.ServingError: INVALID_ARGUMENT for a failure whose message is not UTF-8 (see the code).
    """
    plan = self._plan(tuple(feeds), tuple(fetches))
    feed_dict = {}
    for feed in plan.feeds:
      value = np.asarray(feeds[feed.name], dtype=feed.dtype)
      if feed.dims is not None and not tensor_util.shape_fits(value.shape, feed.dims):
        raise errors.invalid_argument(
          f"Cannot feed value of shape {list(value.shape)} for Tensor "
          f"{feed.name}, which has shape {_shape_text(feed.dims)}"
        )
      feed_dict[feed.output] = value
    buffer = pywrap_tf_session.TF_NewBufferFromString(options.SerializeToString()) if options is not None else None
    try:
      values = self._session._call_tf_sessionrun(  # pylint: disable=protected-access
        buffer, feed_dict, plan.fetches, [], None
      )
    except UnicodeDecodeError as e:
      # TF's binding raises this instead of the run's OpError when the status message is not UTF-8,
      # and the status code is lost with it. Ops put raw bytes in a message when they echo a request's
      # value (ParseExample: "Could not parse example input, value: '...'"): bad input.
      message = e.object.decode("utf-8", errors="backslashreplace") if isinstance(e.object, bytes) else str(e)
      raise errors.invalid_argument(message) from e
    finally:
      if buffer is not None:
        pywrap_tf_session.TF_DeleteBuffer(buffer)
    if len(values) == len(plan.sources):
      return values
    fed = {feed.name: feed_dict[feed.output] for feed in plan.feeds}
    return [values[s] if isinstance(s, int) else fed[s] for s in plan.sources]

  def _plan(self, feed_names: tuple[str, ...], fetch_names: tuple[str, ...]) -> _Plan:
    key = (feed_names, fetch_names)
    plan = self._plans.get(key)
    if plan is not None:
      return plan
    graph = self._session.graph
    feeds, fed_as = [], {}  # fed_as: canonical tensor name -> feed name.
    for name in feed_names:
      tensor = _tensor(graph, name)
      fed_as[tensor.name] = name
      if not graph.is_feedable(tensor):
        raise errors.invalid_argument(f"Tensor {name} may not be fed.")
      shape = tensor.shape
      dims = None if shape.rank is None else tuple(-1 if d is None else d for d in shape.as_list())
      feeds.append(
        _Feed(
          name,
          tensor._as_tf_output(),  # pylint: disable=protected-access
          np.dtype(tensor.dtype.as_numpy_dtype),
          dims,
        )
      )
    fetches, sources = [], []
    for name in fetch_names:
      tensor = _tensor(graph, name)
      if tensor.name in fed_as:
        sources.append(fed_as[tensor.name])
      else:
        sources.append(len(fetches))
        fetches.append(tensor._as_tf_output())  # pylint: disable=protected-access
    plan = _Plan(tuple(feeds), fetches, tuple(sources))
    if len(self._plans) < MAX_PLANS:
      self._plans[key] = plan
    return plan


def _tensor(graph: tf.Graph, name: str) -> tf.Tensor:
  try:
    return graph.get_tensor_by_name(name)
  except (KeyError, ValueError) as e:
    raise errors.invalid_argument(f"{name} is not a tensor of the graph: {e}") from e


def _shape_text(dims: tuple[int, ...]) -> str:
  return "(" + ", ".join("None" if d < 0 else str(d) for d in dims) + ")"
