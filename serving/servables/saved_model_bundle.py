"""A loaded SavedModel version: graph, session and signatures.

Every SavedModel is loaded as TF Serving's C++ loader does: its MetaGraphDef
(tag "serve") is imported into a graph and run through a TF session of its
own, feeding and fetching the tensors its SignatureDefs name. This serves TF1
graph SavedModels and TF2 (`tf.saved_model.save`, Keras) ones alike, and
fetches only the outputs a request asks for.

Versions whose saved_model.pb is the same file content (an index refresh
writes new variables under the previous version's graph) share one imported
graph: each version still gets its own session, so its own variables and
resources, but parsing and `import_graph_def`, which hold the GIL for tens of
milliseconds at the expense of the version answering requests, run once.
"""

import contextlib
import dataclasses
import functools
import hashlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import grpc
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2

# The loader's steps one by one (TF Serving's C++ loader has the same split):
# tf.compat.v1.saved_model.load only runs them all, on a freshly parsed graph.
from tensorflow.python.saved_model import loader_impl

from serving import errors
from serving.servables import direct_session

DEFAULT_SERVING_SIGNATURE = "serving_default"

# Session::Run in the calling thread rather than the inter-op pool that answers requests.
_IN_CALLER_THREAD = config_pb2.RunOptions(inter_op_thread_pool=-1)

# (feeds by tensor name, fetched tensor names, timeout in ms or None) -> values
SessionRunner = Callable[[dict[str, np.ndarray], Sequence[str], int | None], list[np.ndarray]]


def caller_thread(session_config: config_pb2.ConfigProto | None) -> bool:
  """Whether a version's runs execute their ops in the thread that runs them
  (RunOptions.inter_op_thread_pool = -1): unless inter_op_parallelism_threads
  asks for TF's inter-op pool (> 0).

  TF runs every op in the caller's thread when it is negative. Left at 0
  (auto), both paths do so too: an unbatched request in the thread that runs
  it, a batch in its batch thread. Their parallelism comes from concurrent
  requests and batch threads; handing every op to the pool's threads as well
  cost CPU per request and throughput, unbatched and batched alike
  (docs/performance.md, "Serving" and "Tuning").
  """
  return session_config is None or session_config.inter_op_parallelism_threads <= 0


def servable_context(name: str, version: int, signature: str | None = None) -> str:
  """Describes a servable (and signature) for error messages."""
  text = f"model: {name}, version: {version}"
  return f"{text}, signature: {signature}" if signature else text


@dataclasses.dataclass(eq=False)
class _ImportedGraph:
  """A SavedModel's MetaGraph imported into a finalized graph, shared by the
  versions that have the same saved_model.pb."""

  graph: tf.Graph
  meta_graph: meta_graph_pb2.MetaGraphDef
  saver: tf.compat.v1.train.Saver | None


# (saved_model.pb digest, tags) -> the graph; an entry lives while a version
# holding it is loaded.
_imported_graphs: "weakref.WeakValueDictionary[tuple[str, tuple[str, ...]], _ImportedGraph]" = (
  weakref.WeakValueDictionary()
)
_imported_graphs_lock = threading.Lock()


def _saved_model_digest(path: str) -> str:
  """SHA-256 of the version's saved_model.pb (or .pbtxt)."""
  digest = hashlib.sha256()
  for name in ("saved_model.pb", "saved_model.pbtxt"):
    file_path = os.path.join(path, name)
    if os.path.isfile(file_path):
      with open(file_path, "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
      break
  return digest.hexdigest()


def _saved_model_loader(path: str) -> loader_impl.SavedModelLoader:
  """TF's loader of the SavedModel at `path`, a corrupt proto refused as TF
  Serving (and the native data plane) refuse it: DATA_LOSS, not the
  INTERNAL "OSError: Cannot parse file ..." TF's Python reader raises."""
  try:
    return loader_impl.SavedModelLoader(path)
  except OSError as e:
    if "Cannot parse file" not in str(e):
      raise
    binary = os.path.join(path, "saved_model.pb")
    if os.path.exists(binary):
      raise errors.ServingError(grpc.StatusCode.DATA_LOSS, f"Can't parse {binary} as binary proto") from e
    text = os.path.join(path, "saved_model.pbtxt")
    raise errors.ServingError(grpc.StatusCode.DATA_LOSS, f"Can't parse {text} as text proto") from e


def _import_graph(path: str, tags: Sequence[str]) -> _ImportedGraph:
  """The graph of the SavedModel at `path`: imported, or shared with a loaded
  version whose saved_model.pb is identical."""
  key = (_saved_model_digest(path), tuple(sorted(tags)))
  with _imported_graphs_lock:
    imported = _imported_graphs.get(key)
  if imported is not None:
    logging.info("Reusing the imported graph of an identical saved_model.pb for %s", path)
    return imported
  graph = tf.Graph()
  loader = _saved_model_loader(path)
  with graph.as_default():
    saver, _ = loader.load_graph(graph, list(tags))
  graph.finalize()
  imported = _ImportedGraph(graph, loader.get_meta_graph_def_from_tags(list(tags)), saver)
  with _imported_graphs_lock:  # A concurrent load of the same graph may have won: share one.
    return _imported_graphs.setdefault(key, imported)


class LoadedVersion:
  """What every loaded version offers requests, whatever runs its session.

  Subclasses set `name`, `version`, `path`, `meta_graph` and `runner`
  (the session runner requests go through, batched or not).
  """

  name: str
  version: int
  path: str
  meta_graph: meta_graph_pb2.MetaGraphDef
  runner: SessionRunner

  @property
  def signature_defs(self):
    """The SignatureDef map of the loaded MetaGraph."""
    return self.meta_graph.signature_def

  def context(self, signature: str | None = None) -> str:
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
      raise errors.failed_precondition(f'Serving signature key "{name}" not found.').with_context(self.context(name))
    return name, self.meta_graph.signature_def[name]


class SavedModelBundle(LoadedVersion):
  """One loaded version of a model.

  Args:
    name: Model name.
    version: Version number.
    path: The version directory holding saved_model.pb.
    tags: MetaGraph tags to load (TF Serving's --saved_model_tags).
    session_config: ConfigProto for the session.
  """

  def __init__(
    self,
    name: str,
    version: int,
    path: str,
    tags: Sequence[str] = ("serve",),
    session_config: config_pb2.ConfigProto | None = None,
  ):
    self.name = name
    self.version = version
    self.path = path
    self._closed = False
    self._close_callbacks: list[Callable[[], None]] = []
    self._close_lock = threading.Lock()
    self._imported: _ImportedGraph | None = _import_graph(path, tags)
    self.meta_graph: meta_graph_pb2.MetaGraphDef = self._imported.meta_graph
    self._session = tf.compat.v1.Session(graph=self._imported.graph, config=session_config)
    try:
      with background_load():
        _restore_and_initialize(_InCallerThread(self._session), self._imported, path)
        self._direct = direct_session.DirectSession(self._session)
        # A no-op once the restore has run; at normal priority, as Python
        # holds the GIL around it.
        self._direct.extend()
    except Exception:
      self._session.close()
      raise
    self._run_options = _IN_CALLER_THREAD if caller_thread(session_config) else None
    self.runner: SessionRunner = self.session_run

  def session_run(
    self, feeds: dict[str, np.ndarray], fetches: Sequence[str], timeout_ms: int | None = None
  ) -> list[np.ndarray]:
    """Runs the session; thread-safe (TF sessions allow concurrent runs).

    Runs go through `direct_session`: no per-call feed/fetch normalisation,
    and no graph lock that a newly loaded version sharing the graph holds
    while it copies the graph into its session.

    `timeout_ms` (the runner's signature) does not cut the run short: TF
    does that only through RunOptions.timeout_in_ms, whose asynchronous path
    leaks about 0.7 KB per run failing inside the graph in TF 2.20
    (serving/README.md, "Deadlines"). A call's deadline is kept before its
    run instead (batch queues, `service_impl._run_in`).
    """
    del timeout_ms  # See above.
    if self._closed:
      raise errors.unavailable(f"Servable {self.context()} has been unloaded")
    if loading_in_this_thread():  # A warm-up: see background_load().
      with idle_priority():
        return self._direct.run(feeds, fetches, _IN_CALLER_THREAD)
    return self._direct.run(feeds, fetches, self._run_options)

  def on_close(self, callback: Callable[[], None]) -> None:
    """Registers `callback` to run when the servable is unloaded."""
    self._close_callbacks.append(callback)

  def close(self) -> None:
    """Releases the session; further runs fail with UNAVAILABLE.

    The session's teardown (its executors, kernels, function library and
    variables) runs at idle CPU priority. At normal priority its frees keep
    taking the malloc arena lock that the serving version's runs need (one
    arena: runtime.retain_freed_memory) and stall them for the whole teardown
    (figures: docs/history/benchmarks-2026-11.md, "The old version's
    teardown").
    """
    with self._close_lock:
      if not self._closed:
        self._closed = True
        for callback in self._close_callbacks:
          callback()
        with idle_priority():  # TF_CloseSession releases the GIL meanwhile.
          self._session.close()
        self._imported = None  # The shared graph goes with its last version.
        logging.info("Unloaded servable %s", self.context())


def check_checkpoint(path: str, meta_graph: meta_graph_pb2.MetaGraphDef) -> None:
  """Refuses a SavedModel whose graph has variables but whose directory has no checkpoint.

  TF's C++ loader then skips the restore and serves uninitialised variables (every request fails),
  and a half-copied version directory looks just like that: both paths refuse it the same way, so
  the version already serving stays.
  """
  if meta_graph.HasField("saver_def") and not tf.io.gfile.exists(os.path.join(path, "variables", "variables.index")):
    raise errors.failed_precondition(
      f"SavedModel at {path} has variables but no checkpoint of them (variables/variables.index is missing): "
      "an incomplete version directory"
    )


def _restore_and_initialize(session: "_InCallerThread", imported: _ImportedGraph, path: str) -> None:
  """Restores the variables of the version at `path` into `session` and runs
  its init op with its own asset paths, as TF's SavedModel loader does."""
  started = time.monotonic()
  check_checkpoint(path, imported.meta_graph)
  with imported.graph.as_default():
    if imported.saver is not None:
      imported.saver.restore(session, os.path.join(path, "variables", "variables"))
    restored = time.monotonic()
    assets = loader_impl.get_asset_tensors(path, imported.meta_graph)
    init_op = loader_impl.get_init_op(imported.meta_graph)
    if init_op is not None:
      logging.info("Running initialization op on SavedModel bundle at path: %s", path)
      session.run(fetches=[init_op], feed_dict=assets)
  logging.info(
    "Restored the variables in %d microseconds and initialized in %d microseconds at path: %s",
    (restored - started) * 1e6,
    (time.monotonic() - restored) * 1e6,
    path,
  )


class _InCallerThread:
  """The session as TF's SavedModel loader sees it: the restore and init ops it
  runs execute in the calling (load) thread."""

  def __init__(self, session: tf.compat.v1.Session):
    self.graph = session.graph
    self._session = session

  def run(self, fetches, feed_dict=None, options=None, run_metadata=None):
    with idle_priority():
      return self._session.run(
        fetches, feed_dict=feed_dict, options=_in_caller_thread(options), run_metadata=run_metadata
      )


def _in_caller_thread(options: config_pb2.RunOptions | None) -> config_pb2.RunOptions:
  """`options` (or none) with Session::Run executing in the calling thread."""
  merged = config_pb2.RunOptions()
  merged.CopyFrom(_IN_CALLER_THREAD)
  if options is not None:
    merged.MergeFrom(options)
  return merged


_loading = threading.local()


def loading_in_this_thread() -> bool:
  """Whether this thread is loading or warming a version (`background_load`)."""
  return getattr(_loading, "active", False)


@contextlib.contextmanager
def background_load():
  """Runs a version's restore, init and warm-up in the calling thread, pinned
  to one CPU and at idle CPU priority while in TF, so the versions answering
  requests keep the CPUs (re-entrant).

  - Session runs of this thread execute in it (RunOptions
    inter_op_thread_pool=-1), not on TF's shared inter-op pool: the warm-up's
    first request deserialises the ScaNN searcher (seconds of CPU at 1M ads).
  - Each of those runs is SCHED_IDLE (`idle_priority`): this thread, and the
    threads it starts meanwhile (RestoreV2's reader threads), use only CPU
    time no request wants. Only inside the run: the GIL is released there,
    while a starved idle thread holding the GIL would stall every request.
  - One CPU: RestoreV2's readers would otherwise take every core and stall
    requests (bench/load_stalls.py).

  TF's own thread pools start with the first session, before any of this, so
  they keep every CPU and their priority. Sessions must be created outside:
  one created inside starts pinned threads of its own (its first request then
  stalled the serving version for ~1 s). Each part is skipped where the OS
  lacks it.
  """
  if loading_in_this_thread():
    yield
    return
  allowed = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else set()
  _loading.active = True
  try:
    if len(allowed) > 1:
      os.sched_setaffinity(0, {max(allowed)})  # 0: this thread only.
    yield
  finally:
    _loading.active = False
    if len(allowed) > 1:
      os.sched_setaffinity(0, allowed)


@contextlib.contextmanager
def idle_priority():
  """SCHED_IDLE for the calling thread (and threads it starts) meanwhile.

  A no-op where the thread could not return to its policy afterwards.
  """
  if not _can_leave_idle_priority():
    yield
    return
  policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
  os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
  try:
    yield
  finally:
    os.sched_setscheduler(0, policy, param)


@functools.cache
def _can_leave_idle_priority() -> bool:
  """Whether a thread may go SCHED_IDLE and back, tried on a throwaway thread.

  Leaving SCHED_IDLE needs CAP_SYS_NICE or a RLIMIT_NICE that admits nice 0
  (sched(7)); containers often have neither, and a loader thread left at idle
  priority would starve under load.
  """
  if not hasattr(os, "SCHED_IDLE"):
    return False
  outcome = []

  def attempt():
    try:
      policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
      os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
      os.sched_setscheduler(0, policy, param)
      outcome.append(True)
    except OSError as e:
      logging.info("Loads run at normal CPU priority: %s", e)

  probe = threading.Thread(target=attempt, name="sched-idle-probe")
  probe.start()
  probe.join()
  return bool(outcome)


def has_saved_model(path: str) -> bool:
  """True if `path` holds a SavedModel proto (binary or text)."""
  return os.path.isfile(os.path.join(path, "saved_model.pb")) or os.path.isfile(os.path.join(path, "saved_model.pbtxt"))
