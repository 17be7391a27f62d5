"""A loaded SavedModel version whose session runs in the native data plane.

With `--native` (serving/native, #26) every version is loaded once, by the
native module: `_fgr_native.Session` loads the SavedModel through TF's C API
(TF_LoadSessionFromSavedModel) and `_fgr_native.Servable` runs it, batching
calls in C++ when batching is on. The native gRPC front end answers Predict
with that Servable without Python; everything Python serves (REST, Classify,
Regress, MultiInference, metadata, warm-up, and the gRPC calls the native
front end hands back) runs through the same Servable via `NativeBundle.runner`.
So a version's variables and index are in memory once, whichever front end
asks.

`NativeBundle` has SavedModelBundle's interface (servables/saved_model_bundle.py),
and keeps its scheduling: the restore, init and warm-up run in the load thread
at idle CPU priority on one CPU (`background_load`), and the session's
teardown at idle priority.
"""

import dataclasses
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2

from serving import errors
from serving.batching import batch_scheduler
from serving.servables import request_limits, saved_model_bundle

# What fgr-export writes beside every version it publishes (export.version_report.REPORT_FILE; serving
# does not import the exporter).
_FGR_EXPORT_REPORT = os.path.join("assets.extra", "export_report.json")

# Batch-budget errors name these flags; over REST they answer 413, as in Python (batch_scheduler).
_BATCH_LIMIT_FLAGS = ("--max_elements_per_batch", "--max_bytes_per_batch")


@dataclasses.dataclass(frozen=True)
class NativeRuntime:
  """What the native servables of one server share.

  Attributes:
    module: The `_fgr_native` extension module.
    metrics: Its `Metrics`, where Servables record batch sizes and padding.
    limits: The request-expansion limits (each signature's request limits
      and, with batching, each queue's batch budget).
  """

  module: ModuleType
  metrics: Any
  limits: request_limits.ExpansionLimits


@dataclasses.dataclass(frozen=True)
class NativeBatching:
  """Server-wide native batching: the shared `_fgr_native.BatchScheduler`
  and BatchingParameters' queue options."""

  scheduler: Any
  options: batch_scheduler.QueueOptions


def _dims(info: meta_graph_pb2.TensorInfo) -> list[int] | None:
  """The signature's shape for an input (-1: unknown size); None: any shape."""
  if info.tensor_shape.unknown_rank or not info.HasField("tensor_shape"):
    return None
  return [d.size for d in info.tensor_shape.dim]


def servable_signatures(
  signature_defs: Mapping[str, meta_graph_pb2.SignatureDef], limits: request_limits.ExpansionLimits
) -> dict[str, tuple]:
  """The signatures the native Predict path may answer, as `_fgr_native.Servable` takes them.

  key -> (method_name, {alias: (tensor name, dtype, dims or None)},
  {alias: (tensor name, dtype)}, (max elements, max bytes) per request).
  Signatures with `defaults`, and ones with a sparse or composite input or
  output, are left out: the native front end hands their requests to Python.
  """
  signatures = {}
  for key, signature in signature_defs.items():
    infos = list(signature.inputs.values()) + list(signature.outputs.values())
    if signature.defaults or any(info.WhichOneof("encoding") != "name" for info in infos):
      continue
    inputs = {alias: (info.name, int(info.dtype), _dims(info)) for alias, info in signature.inputs.items()}
    outputs = {alias: (info.name, int(info.dtype)) for alias, info in signature.outputs.items()}
    signatures[key] = (signature.method_name, inputs, outputs, tuple(limits.request_limits(signature)))
  return signatures


def serving_error(error: Exception) -> errors.ServingError:
  """A `_fgr_native.NativeError` (`.code`, `.message`) as a ServingError."""
  code = errors.code_from_number(error.code)
  http_status = None
  if code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(flag in error.message for flag in _BATCH_LIMIT_FLAGS):
    http_status = request_limits.HTTP_STATUS
  return errors.ServingError(code, error.message, http_status)


_pools_lock = threading.Lock()
_pools_started = False


def start_thread_pools(session_config: config_pb2.ConfigProto | None) -> None:
  """Starts TF's process-wide session thread pools at normal priority on
  every CPU, once, before the first native load.

  The first session of the process creates TF's inter-op pool (sized by its
  config) and the CPU device's intra-op pool, which every later session
  shares, and their threads inherit the creating thread's CPU affinity and
  scheduling policy. A native load creates its session inside
  `background_load` (one CPU, SCHED_IDLE), so it must not be the first: a
  throwaway session with the servables' config comes first. (The Python
  path creates its sessions outside `background_load` for the same reason.)
  """
  global _pools_started
  with _pools_lock:
    if _pools_started:
      return
    tf.compat.v1.Session(graph=tf.Graph(), config=session_config).close()
    _pools_started = True


class NativeBundle(saved_model_bundle.LoadedVersion):
  """One loaded version of a model, run by the native data plane.

  Args:
    name: Model name.
    version: Version number.
    path: The version directory holding saved_model.pb.
    runtime: The server's native module, metrics and limits.
    tags: MetaGraph tags to load (TF Serving's --saved_model_tags).
    session_config: ConfigProto for the session.
    batching: Native batching, or None to run every call unbatched.

  Raises:
    ServingError: if the SavedModel fails to load, with TF's code.
  """

  def __init__(
    self,
    name: str,
    version: int,
    path: str,
    runtime: NativeRuntime,
    tags: Sequence[str] = ("serve",),
    session_config: config_pb2.ConfigProto | None = None,
    batching: NativeBatching | None = None,
  ):
    self.name = name
    self.version = version
    self.path = path
    self._native_error = runtime.module.NativeError
    self._closed = False
    self._close_callbacks: list[Callable[[], None]] = []
    self._close_lock = threading.Lock()
    config = session_config.SerializeToString() if session_config is not None else b""
    start_thread_pools(session_config)
    try:
      # The restore and init ops run in this thread (see background_load);
      # the GIL is released meanwhile.
      with saved_model_bundle.background_load(), saved_model_bundle.idle_priority():
        self._session = runtime.module.Session(path, list(tags), config)
    except self._native_error as e:
      raise serving_error(e) from e
    try:
      meta_graph = meta_graph_pb2.MetaGraphDef.FromString(self._session.meta_graph_def)
      saved_model_bundle.check_checkpoint(path, meta_graph)
      # The session holds the graph; requests only read the signatures.
      meta_graph.ClearField("graph_def")
      meta_graph.ClearField("object_graph_def")
      self.meta_graph = meta_graph
      self.servable = runtime.module.Servable(
        self._session,
        name,
        version,
        servable_signatures(meta_graph.signature_def, runtime.limits),
        self._batching(batching, runtime.limits, saved_model_bundle.caller_thread(session_config)),
        runtime.metrics,
      )
    except Exception:
      self._session.close()
      raise
    self.runner = self._run

  def _batching(
    self, batching: NativeBatching | None, limits: request_limits.ExpansionLimits, in_caller_thread: bool
  ) -> dict | None:
    if batching is None:
      return None
    options = batching.options
    if options.pad_variable_length_inputs and os.path.exists(os.path.join(self.path, _FGR_EXPORT_REPORT)):
      # TF Serving's padding (a request's first element) is not the "" these graphs mask: their answers
      # to narrower requests change silently, so each load of one with padding on says so.
      logging.warning(
        'Servable (%s) is an fgr-export graph, which reads only "" as padding, but pad_variable_length_inputs '
        "pads each request with its first element (as TF Serving): a request narrower than others in its "
        'batch gets another answer. Turn the padding off, or send equal widths padded with "".',
        self.context(),
      )
    return {
      "scheduler": batching.scheduler,
      "max_batch_size": options.max_batch_size,
      "batch_timeout_micros": options.batch_timeout_micros,
      "max_enqueued_batches": options.max_enqueued_batches,
      "allowed_batch_sizes": list(options.allowed_batch_sizes),
      "pad_variable_length_inputs": options.pad_variable_length_inputs,
      "in_caller_thread": in_caller_thread,
      "budget": limits.batch_budget(self.signature_defs, options.max_batch_size),
    }

  def _run(
    self, feeds: dict[str, np.ndarray], fetches: Sequence[str], timeout_ms: int | None = None
  ) -> list[np.ndarray]:
    """The runner Python's requests use: the native Servable (batched when
    batching is on); in a load or warm-up, the session in this thread at
    idle priority (`session_run`)."""
    if saved_model_bundle.loading_in_this_thread():
      return self.session_run(feeds, fetches, timeout_ms)
    try:
      return self.servable.run(feeds, list(fetches), timeout_ms)
    except self._native_error as e:
      raise serving_error(e) from e

  def session_run(
    self, feeds: dict[str, np.ndarray], fetches: Sequence[str], timeout_ms: int | None = None
  ) -> list[np.ndarray]:
    """Runs the session unbatched; thread-safe. In a load or warm-up
    (`background_load`) the run executes in this thread at idle priority.
    As `SavedModelBundle.session_run`, `timeout_ms` does not cut the run
    short (the native Session::Run says why)."""
    del timeout_ms  # See above.
    if self._closed:
      raise errors.unavailable(f"Servable {self.context()} has been unloaded")
    try:
      if saved_model_bundle.loading_in_this_thread():
        with saved_model_bundle.idle_priority():
          return self._session.run(feeds, list(fetches), in_caller_thread=True)
      return self._session.run(feeds, list(fetches))
    except self._native_error as e:
      raise serving_error(e) from e

  def on_close(self, callback: Callable[[], None]) -> None:
    """Registers `callback` to run when the servable is unloaded."""
    self._close_callbacks.append(callback)

  def close(self) -> None:
    """Detaches the Servable (its batch queues), then closes the session at
    idle CPU priority, as SavedModelBundle.close does and for its reasons.

    The caller has already taken the version out of the native front end's
    routing (ServerCore), so no new request reaches it.
    """
    with self._close_lock:
      if self._closed:
        return
      self._closed = True
      for callback in self._close_callbacks:
        callback()
      self.servable.close()
      with saved_model_bundle.idle_priority():  # The session's close releases the GIL.
        self._session.close()
      logging.info("Unloaded servable %s", self.context())
