"""Manages the versions of one model: discover, load, route, swap, unload."""

import concurrent.futures
import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator

import grpc
from absl import logging
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import errors
from serving.core import aspired_versions_policy, file_system_source, loader
from serving.servables import saved_model_bundle

State = get_model_status_pb2.ModelVersionStatus.State
# (model name, {version: bundle} of its AVAILABLE versions) -> None
AvailableCallback = Callable[[str, dict[int, saved_model_bundle.LoadedVersion]], None]


class _Version:
  """Book-keeping for one version (TF Serving's LoaderHarness + state)."""

  def __init__(self, version: int, path: str):
    self.version = version
    self.path = path
    self.mtime = file_system_source.version_mtime(path)
    self.state = State.START
    self.error: errors.ServingError | None = None
    self.bundle: saved_model_bundle.LoadedVersion | None = None
    self.in_flight = 0
    self.attempts = 0  # Load attempts started.
    self.last_error: errors.ServingError | None = None  # Of the last failed attempt.
    # Set while LOADING between a failed attempt and its retry.
    self.retry_timer: threading.Timer | None = None
    # No longer aspired while LOADING: no further attempt (TF Serving's
    # cancel_load_retry). An attempt already running still finishes.
    self.cancelled = False


class ModelManager:
  """Owns every version of one model.

  Loads run on `load_pool`, unloads on `unload_pool`. Requests take a handle
  on an AVAILABLE version; an unloading version stops taking new handles,
  waits for its in-flight requests, then closes its session.

  A failed load is retried `max_num_load_retries` times. Between attempts
  the version stays LOADING but holds no load thread: a timer queues the
  next attempt, so other versions load meanwhile. A version that leaves the
  aspired set (removed from disk, or no longer wanted by the version policy)
  is not tried again, as TF Serving's CancelLoadServableRetry: it ends at
  once with its last load error, and a newer version does not wait behind
  its retries.

  Args:
    config: The model's ModelConfig (name, base_path, version policy).
    loader_options: How to load versions.
    load_pool: Executor for loads.
    unload_pool: Executor for unloads.
    policy: When old versions may unload (availability preserving).
    on_available: Called, under the manager's lock, with the AVAILABLE
      versions each time they change: after a version becomes AVAILABLE,
      and when one stops taking requests, before its unload begins. A front
      end routing requests by itself (the native data plane) follows it.
  """

  def __init__(
    self,
    config: model_server_config_pb2.ModelConfig,
    loader_options: loader.LoaderOptions,
    load_pool: concurrent.futures.Executor,
    unload_pool: concurrent.futures.Executor,
    policy: aspired_versions_policy.AspiredVersionPolicy,
    on_available: AvailableCallback | None = None,
  ):
    self.name = config.name
    self._on_available = on_available
    self._config = config
    self._loader_options = loader_options
    self._reserved = False  # See _rehearse_next_load.
    self._load_pool = load_pool
    self._unload_pool = unload_pool
    self._policy = policy
    self._cond = threading.Condition()
    self._versions: dict[int, _Version] = {}
    self._aspired: set = set()
    self._stopped = threading.Event()
    # The last `specific` policy warning logged: (missing versions, none named, none aspired).
    self._specific_warning: tuple[tuple[int, ...], bool, bool] = ((), False, False)

  @property
  def config(self) -> model_server_config_pb2.ModelConfig:
    return self._config

  def update_config(self, config: model_server_config_pb2.ModelConfig) -> None:
    """Applies a new policy or base path, then reconciles with the disk.

    As TF Serving, a version is known by its number: one loaded from the
    old base path keeps serving if the new path has the same number.
    """
    with self._cond:
      old_base_path, self._config = self._config.base_path, config
      kept = sorted(v for v, e in self._versions.items() if e.state in (State.LOADING, State.AVAILABLE))
    if config.base_path != old_base_path and kept:
      logging.warning(
        "Model %s base_path changed from %s to %s: versions %s loaded from the old path keep serving where the new "
        "path has the same number (as TF Serving); to serve the new path's copy, remove the model in one reload "
        "and add it back in the next, or publish it as a new version",
        self.name,
        old_base_path,
        config.base_path,
        kept,
      )
    self.poll()

  def poll(self) -> None:
    """Reconciles loaded versions with the aspired versions on disk."""
    if self._stopped.is_set():
      return
    on_disk = file_system_source.list_versions(self._config.base_path)
    if not on_disk:
      # Keeps whatever is serving: as TF Serving when the base path is missing; when it exists
      # but holds no version, TF Serving unloads every version (e.g. a store being re-synced).
      logging.log_every_n_seconds(
        logging.WARNING, "No versions of servable %s found under base path %s", 60, self.name, self._config.base_path
      )
      return
    aspired = file_system_source.aspired_versions(on_disk, self._config)
    self._warn_missing_specific(on_disk, aspired)
    if not aspired:
      # A `specific` policy naming no version on disk (yet: the config often lands before the
      # model). TF Serving unloads every version then; we keep what serves, as for an empty
      # base path, until a named version appears.
      return
    with self._cond:
      self._aspired = aspired
      for version, entry in list(self._versions.items()):
        if version not in aspired and entry.state == State.LOADING and not entry.cancelled:
          self._cancel_load_retries_locked(entry)
      for version in sorted(aspired, reverse=True):
        entry = self._versions.get(version)
        if entry is None or self._should_reload(entry, on_disk[version]):
          self._start_load_locked(version, on_disk[version])
      self._unload_unaspired_locked()

  def _warn_missing_specific(self, on_disk: dict[int, str], aspired: set[int]) -> None:
    """Logs, in TF Serving's words, the `specific` versions not on disk,
    once each time that set changes (TF Serving logs it at every poll)."""
    missing = file_system_source.missing_specific_versions(on_disk, self._config)
    policy = self._config.model_version_policy
    no_versions_named = policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions
    warning = (tuple(missing), no_versions_named, not aspired)
    if warning == self._specific_warning:
      return
    self._specific_warning = warning
    if no_versions_named:
      logging.warning("No specific versions requested for servable %s.", self.name)
    for version in missing:
      logging.warning(
        "Version %d of servable %s, which was requested to be served as a 'specific' version in the "
        "servable's version policy, was not found in the file system",
        version,
        self.name,
      )
    if not aspired:
      logging.warning(
        "No versions of servable %s found under base path %s. Did you forget to name your leaf directory as a "
        "number (eg. '/1/')? The versions it serves (%s) keep serving",
        self.name,
        self._config.base_path,
        self.available_versions() or "none",
      )

  def _start_load_locked(self, version: int, path: str) -> None:
    entry = _Version(version, path)
    self._versions[version] = entry
    entry.state = State.LOADING
    logging.info("Loading servable %s", saved_model_bundle.servable_context(self.name, version))
    self._load_pool.submit(self._load, entry)

  @staticmethod
  def _should_reload(entry: _Version, path: str) -> bool:
    """An ended version loads again if rewritten, if it was unloaded, or if
    its retries were cancelled (it left the aspired set and came back)."""
    if entry.state != State.END:
      return False
    if entry.error is None or entry.cancelled:
      return True
    return file_system_source.version_mtime(path) != entry.mtime

  def _cancel_load_retries_locked(self, entry: _Version) -> None:
    """Stops retrying a LOADING version that left the aspired set.

    Waiting for a retry, it ends now with its last load error (TF Serving
    reports END with that error too). Queued, it ends when its turn comes,
    without an attempt. An attempt already running finishes: a failure ends
    the version; a success serves it until the policy unloads it.
    """
    entry.cancelled = True
    context = saved_model_bundle.servable_context(self.name, entry.version)
    if entry.retry_timer is None:
      logging.info("Servable %s is no longer aspired: its load will not be retried", context)
      return
    entry.retry_timer.cancel()
    entry.retry_timer = None
    logging.info("Servable %s is no longer aspired: its load retries are cancelled", context)
    self._end_failed_load_locked(entry, entry.last_error)

  def _end_failed_load_locked(self, entry: _Version, error: errors.ServingError | None) -> None:
    """Ends a version whose load failed or was cancelled; `error` None: it
    was never tried (stopped while queued)."""
    entry.state, entry.error = State.END, error
    if error is not None:
      logging.error(
        "Failed to load servable %s: %s", saved_model_bundle.servable_context(self.name, entry.version), error.message
      )
    self._unload_unaspired_locked()  # One fewer version to wait for: the policy may now unload.
    self._cond.notify_all()

  def _load(self, entry: _Version) -> None:
    """One load attempt (on a load thread); a failure may schedule a retry."""
    with self._cond:
      if self._stopped.is_set() or entry.cancelled:  # Stopped, or unaspired while queued: don't load.
        error = entry.last_error
        if error is None and entry.cancelled:
          error = errors.ServingError(
            grpc.StatusCode.CANCELLED,
            f"Load cancelled before it was tried: the version is no longer aspired "
            f"[{saved_model_bundle.servable_context(self.name, entry.version)}]",
          )
        self._end_failed_load_locked(entry, error)
        return
      entry.attempts += 1
    try:
      bundle = loader.load_once(self.name, entry.version, entry.path, self._loader_options, self._stopped)
    except errors.ServingError as e:
      with self._cond:
        entry.last_error = e
        if entry.attempts > self._loader_options.max_num_load_retries or entry.cancelled or self._stopped.is_set():
          self._end_failed_load_locked(entry, e)
        else:
          self._schedule_retry_locked(entry)
      return
    except BaseException as e:  # Keep the manager consistent whatever fails.
      with self._cond:
        entry.state, entry.error = State.END, errors.from_exception(e)
        self._cond.notify_all()
      raise
    if self._loader_options.reserve_next_version_memory and not self._reserved:
      self._reserved = True
      self._rehearse_next_load(entry)
    with self._cond:
      if self._stopped.is_set():
        entry.state = State.END
        bundle.close()
        self._cond.notify_all()
        return
      entry.bundle = bundle
      entry.state = State.AVAILABLE  # Latest() now resolves here: the switch.
      self._publish_available_locked()
      logging.info("Successfully loaded servable version %s", bundle.context())
      self._unload_unaspired_locked()
      self._cond.notify_all()

  def _schedule_retry_locked(self, entry: _Version) -> None:
    """Queues the next attempt of `entry` after the retry interval.

    A timer waits, not a load thread: other versions load meanwhile, and a
    cancel (poll, stop) ends the wait at once.
    """
    interval = max(0.0, self._loader_options.load_retry_interval_seconds)
    logging.warning(
      "Loading %s failed (%s); retry %d of %d in %.1fs",
      saved_model_bundle.servable_context(self.name, entry.version),
      entry.last_error.message,
      entry.attempts,
      self._loader_options.max_num_load_retries,
      interval,
    )
    timer = threading.Timer(interval, self._retry, (entry,))
    timer.name = "load-retry"
    timer.daemon = True  # A pending retry never holds the process at exit.
    entry.retry_timer = timer
    timer.start()
    self._cond.notify_all()  # The attempt failed: wait_until_tried need not wait for the retry.

  def _retry(self, entry: _Version) -> None:
    """Timer callback: queues the next attempt unless cancelled or stopped meanwhile."""
    with self._cond:
      if entry.retry_timer is None:  # Cancelled (unaspired) or stopped: already ended.
        return
      entry.retry_timer = None
      try:
        self._load_pool.submit(self._load, entry)
      except RuntimeError:  # The load pool shut down: the server is stopping.
        self._end_failed_load_locked(entry, entry.last_error)

  def _rehearse_next_load(self, entry: _Version) -> None:
    """Loads the first version once more and unloads it, before it serves.

    With freed memory kept in the process (runtime.retain_freed_memory), the
    next version's load then reuses pages this one touched instead of
    faulting in fresh ones while the first version answers requests.
    """
    started = time.monotonic()
    try:
      rehearsal = loader.load_once(self.name, entry.version, entry.path, self._loader_options, self._stopped)
    except errors.ServingError as e:
      logging.warning("Rehearsing the next load of %s failed: %s", self.name, e.message)
      return
    rehearsal.close()
    del rehearsal
    gc.collect()
    logging.info("Rehearsed the next load of %s in %.2f s", self.name, time.monotonic() - started)

  def _unload_unaspired_locked(self) -> None:
    serving = {v for v, e in self._versions.items() if e.state == State.AVAILABLE and v not in self._aspired}
    available = {v for v, e in self._versions.items() if e.state == State.AVAILABLE}
    loading = {v for v, e in self._versions.items() if e.state in (State.START, State.LOADING)}
    for version in self._policy.versions_to_unload(serving, self._aspired, available, loading):
      self._begin_unload_locked(self._versions[version])

  def _begin_unload_locked(self, entry: _Version) -> None:
    entry.state = State.UNLOADING  # No new handles from here on.
    self._publish_available_locked()  # Nor new routes, before the unload starts.
    self._unload_pool.submit(self._unload, entry)

  def _publish_available_locked(self) -> None:
    if self._on_available is None:
      return
    available = {v: e.bundle for v, e in self._versions.items() if e.state == State.AVAILABLE}
    try:
      self._on_available(self.name, available)
    except Exception:  # Routing must not break the version manager.
      logging.exception("Publishing the available versions of %s failed", self.name)

  def _unload(self, entry: _Version) -> None:
    with self._cond:
      while entry.in_flight:
        self._cond.wait()  # Let in-flight requests finish on this version.
      bundle, entry.bundle = entry.bundle, None
    if bundle is not None:
      bundle.close()
      # A closed graph and session sit in reference cycles: collect them here,
      # on this background thread, rather than at whatever request happens to
      # trigger the next full collection (released memory stays bounded too).
      del bundle
      gc.collect()
    with self._cond:
      entry.state = State.END
      # A config reload may have asked for this version again while it unloaded: load it now, as a
      # poll would only at its next turn (the reload waits for it, and answers once it serves).
      if entry.version in self._aspired and not self._stopped.is_set() and self._versions.get(entry.version) is entry:
        self._start_load_locked(entry.version, entry.path)
      self._cond.notify_all()

  @contextlib.contextmanager
  def handle(self, request_text: str, version: int | None = None) -> Iterator[saved_model_bundle.LoadedVersion]:
    """Yields an AVAILABLE version (the latest if `version` is None).

    Args:
      request_text: TF Serving's request description for NOT_FOUND errors,
        e.g. "Latest(name)".
      version: A specific version, or None for the latest.
    """
    with self._cond:
      if version is None:
        candidates = [e for e in self._versions.values() if e.state == State.AVAILABLE]
        entry = max(candidates, key=lambda e: e.version, default=None)
      else:
        entry = self._versions.get(version)
        if entry is not None and entry.state != State.AVAILABLE:
          entry = None
      if entry is None:
        raise errors.not_found(f"Servable not found for request: {request_text}")
      entry.in_flight += 1
      bundle = entry.bundle
    try:
      yield bundle
    finally:
      with self._cond:
        entry.in_flight -= 1
        if not entry.in_flight:
          self._cond.notify_all()

  def version_states(self) -> list[tuple[int, int, errors.ServingError | None]]:
    """Returns [(version, state, error)] for every version ever seen."""
    with self._cond:
      return [(v, e.state, e.error) for v, e in sorted(self._versions.items())]

  def available_versions(self) -> list[int]:
    with self._cond:
      return sorted(v for v, e in self._versions.items() if e.state == State.AVAILABLE)

  def settled(self) -> bool:
    """True when no aspired version is waiting to load."""
    with self._cond:
      return self._settled_locked()

  def _settled_locked(self) -> bool:
    return all(
      self._versions[v].state in (State.AVAILABLE, State.END) for v in self._aspired if v in self._versions
    ) and all(v in self._versions for v in self._aspired)

  def wait_until_settled(self, timeout: float | None = None) -> bool:
    """Blocks until every aspired version is AVAILABLE or failed."""
    with self._cond:
      return self._cond.wait_for(self._settled_locked, timeout)

  def wait_until_tried(self, timeout: float | None = None) -> bool:
    """Blocks until every aspired version is AVAILABLE, failed, or has
    failed a load attempt and waits to retry: a reload of a model already
    served answers then, rather than after every retry (minutes, with TF
    Serving's default retry flags), while the model serves on."""

    def tried() -> bool:
      return all(
        v in self._versions
        and (self._versions[v].state in (State.AVAILABLE, State.END) or self._versions[v].last_error is not None)
        for v in self._aspired
      )

    with self._cond:
      return self._cond.wait_for(tried, timeout)

  def has_aspired(self) -> bool:
    with self._cond:
      return bool(self._aspired)

  def first_error(self) -> errors.ServingError | None:
    """The load error of an aspired version, if any failed."""
    with self._cond:
      for v in sorted(self._aspired, reverse=True):
        entry = self._versions.get(v)
        if entry is not None and entry.error is not None:
          return entry.error
    return None

  def stop(self) -> None:
    """Unloads every version (model removed or server shutting down)."""
    self._stopped.set()
    with self._cond:
      self._aspired = set()
      for entry in self._versions.values():
        if entry.retry_timer is not None:  # Waiting to retry: no more attempts.
          entry.retry_timer.cancel()
          entry.retry_timer = None
          self._end_failed_load_locked(entry, entry.last_error)
      for entry in self._versions.values():
        if entry.state == State.AVAILABLE:
          self._begin_unload_locked(entry)

  def wait_until_unloaded(self, timeout: float | None = None) -> bool:
    """Blocks until no version is loaded or unloading.

    Once stopped, a version still LOADING is not waited for: TensorFlow cannot cancel a load, which
    may take minutes (or never end, on a hung file system), and nothing will be served from it. Its
    attempt closes what it loaded when it returns (`_load`).
    """

    def unloaded() -> bool:
      stopped = self._stopped.is_set()
      return all(e.state == State.END or (stopped and e.state == State.LOADING) for e in self._versions.values())

    with self._cond:
      return self._cond.wait_for(unloaded, timeout)

  def loading_versions(self) -> list[int]:
    """The versions still LOADING (after `stop`: loads left running, see `wait_until_unloaded`)."""
    with self._cond:
      return sorted(v for v, e in self._versions.items() if e.state == State.LOADING)
