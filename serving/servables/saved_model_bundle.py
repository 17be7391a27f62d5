"""A loaded SavedModel version: graph, session and signatures.

Every SavedModel is loaded as TF Serving's C++ loader does: its MetaGraphDef
(tag "serve") is imported into a fresh graph and run through a TF session,
feeding and fetching the tensors its SignatureDefs name. This serves TF1
graph SavedModels and TF2 (`tf.saved_model.save`, Keras) ones alike, and
fetches only the outputs a request asks for.
"""

import contextlib
import os
import threading
from typing import Callable, Dict, List, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from serving import errors

DEFAULT_SERVING_SIGNATURE = "serving_default"

# Session::Run in the calling thread rather than the inter-op pool that answers requests.
_IN_CALLER_THREAD = config_pb2.RunOptions(inter_op_thread_pool=-1)

# (feeds by tensor name, fetched tensor names, timeout in ms or None) -> values
SessionRunner = Callable[[Dict[str, np.ndarray], Sequence[str], Optional[int]],
                         List[np.ndarray]]


def servable_context(name: str, version: int,
                     signature: Optional[str] = None) -> str:
  """Describes a servable (and signature) for error messages."""
  text = f"model: {name}, version: {version}"
  return f"{text}, signature: {signature}" if signature else text


class SavedModelBundle:
  """One loaded version of a model.

  Args:
    name: Model name.
    version: Version number.
    path: The version directory holding saved_model.pb.
    tags: MetaGraph tags to load (TF Serving's --saved_model_tags).
    session_config: ConfigProto for the session.
  """

  def __init__(self, name: str, version: int, path: str,
               tags: Sequence[str] = ("serve",),
               session_config: Optional[config_pb2.ConfigProto] = None):
    self.name = name
    self.version = version
    self.path = path
    self._graph = tf.Graph()
    self._session = tf.compat.v1.Session(graph=self._graph,
                                         config=session_config)
    self._closed = False
    self._close_callbacks: List[Callable[[], None]] = []
    self._close_lock = threading.Lock()
    try:
      with self._graph.as_default(), _on_one_cpu():
        self.meta_graph: meta_graph_pb2.MetaGraphDef = (
            tf.compat.v1.saved_model.loader.load(_InCallerThread(self._session),
                                                 list(tags), path))
    except Exception:
      self._session.close()
      raise
    self._graph.finalize()
    self.runner: SessionRunner = self.session_run

  @property
  def signature_defs(self):
    """The SignatureDef map of the loaded MetaGraph."""
    return self.meta_graph.signature_def

  def context(self, signature: Optional[str] = None) -> str:
    return servable_context(self.name, self.version, signature)

  def fill_model_spec(self, model_spec, signature_name: str = "") -> None:
    """Writes this servable's name, version and `signature_name` into a
    response's ModelSpec."""
    model_spec.name = self.name
    model_spec.version.value = self.version
    if signature_name:
      model_spec.signature_name = signature_name

  def signature(self, signature_name: str):
    """Returns (resolved name, SignatureDef); empty name = serving_default.

    Raises:
      ServingError: FAILED_PRECONDITION if the signature does not exist, as
        TF Serving's Predict answers.
    """
    name = signature_name or DEFAULT_SERVING_SIGNATURE
    if name not in self.meta_graph.signature_def:
      raise errors.failed_precondition(
          f"Serving signature key \"{name}\" not found.").with_context(
              self.context(name))
    return name, self.meta_graph.signature_def[name]

  def session_run(self, feeds: Dict[str, np.ndarray], fetches: Sequence[str],
                  timeout_ms: Optional[int] = None) -> List[np.ndarray]:
    """Runs the session; thread-safe (TF sessions allow concurrent runs)."""
    if self._closed:
      raise errors.unavailable(
          f"Servable {self.context()} has been unloaded")
    options = None
    if timeout_ms is not None and timeout_ms > 0:
      options = config_pb2.RunOptions(timeout_in_ms=int(timeout_ms))
    return self._session.run(list(fetches), feed_dict=feeds, options=options)

  def on_close(self, callback: Callable[[], None]) -> None:
    """Registers `callback` to run when the servable is unloaded."""
    self._close_callbacks.append(callback)

  def close(self) -> None:
    """Releases the session; further runs fail with UNAVAILABLE."""
    with self._close_lock:
      if not self._closed:
        self._closed = True
        for callback in self._close_callbacks:
          callback()
        self._session.close()
        logging.info("Unloaded servable %s", self.context())


class _InCallerThread:
  """The session as TF's SavedModel loader sees it: the restore and init ops it
  runs execute in the calling (load) thread."""

  def __init__(self, session: tf.compat.v1.Session):
    self.graph = session.graph
    self._session = session

  def run(self, fetches, feed_dict=None, options=None, run_metadata=None):
    merged = config_pb2.RunOptions()
    merged.CopyFrom(_IN_CALLER_THREAD)
    if options is not None:
      merged.MergeFrom(options)
    return self._session.run(fetches, feed_dict=feed_dict, options=merged,
                             run_metadata=run_metadata)


@contextlib.contextmanager
def _on_one_cpu():
  """Pins the calling thread, and the threads it starts meanwhile, to one CPU.

  RestoreV2 reads large tensors on a pool of reader threads it starts itself,
  which would take every core from the version answering requests (a 1M-ad
  ScaNN version, 360 MB of variables, 2 cores: request p99 12-67 ms during an
  unpinned restore; see bench/load_stalls.py). TensorFlow's own thread pools
  exist before this (they start with the first session), so they keep every
  CPU. A no-op on one CPU or without `os.sched_setaffinity`.
  """
  if not hasattr(os, "sched_setaffinity"):
    yield
    return
  allowed = os.sched_getaffinity(0)
  if len(allowed) < 2:
    yield
    return
  os.sched_setaffinity(0, {max(allowed)})  # 0: this thread only.
  try:
    yield
  finally:
    os.sched_setaffinity(0, allowed)


def has_saved_model(path: str) -> bool:
  """True if `path` holds a SavedModel proto (binary or text)."""
  return (os.path.isfile(os.path.join(path, "saved_model.pb")) or
          os.path.isfile(os.path.join(path, "saved_model.pbtxt")))
