"""ServerCore: all models, their config, labels, polling and request routing."""

import collections
import concurrent.futures
import contextlib
import os
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Protocol

from absl import logging
from tensorflow_serving.apis import get_model_status_pb2, model_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import errors
from serving.core import aspired_versions_policy, file_system_source, loader, model_manager
from serving.servables import saved_model_bundle

_TENSORFLOW_PLATFORM = "tensorflow"
# A URI's scheme and "://" (e.g. gs://).
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_relative_path(base_path: str) -> bool:
  """Whether `base_path` is neither absolute nor a URI (TF Serving's UriIsRelativePath)."""
  return not (os.path.isabs(base_path) or _URI_SCHEME.match(base_path))


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
  """The config TF Serving derives from --model_name/--model_base_path."""
  config = model_server_config_pb2.ModelServerConfig()
  model = config.model_config_list.config.add()
  model.name = name
  model.base_path = base_path
  model.model_platform = _TENSORFLOW_PLATFORM
  return config


class Router(Protocol):
  """A front end that routes requests to versions by itself (the native data plane)."""

  def set_model(self, name: str, versions: dict[int, saved_model_bundle.LoadedVersion], labels: dict[str, int]):
    """Replaces the model's AVAILABLE versions and its version labels; empty
    `versions`: the model serves no more."""


def _validate(config: model_server_config_pb2.ModelServerConfig) -> None:
  choice = config.WhichOneof("config")
  if choice is None:  # E.g. a config file caught mid-write, truncated to nothing.
    # FAILED_PRECONDITION, as TF Serving refuses leaving a model_config_list (only the first config
    # may be empty: ServerCore.reload_config).
    raise errors.failed_precondition(
      "ModelServerConfig is empty: it must hold a model_config_list (`model_config_list {}` serves no model)"
    )
  if choice != "model_config_list":
    raise errors.invalid_argument(
      "ModelServerConfig must hold a model_config_list; custom_model_config is not supported"
    )
  seen = set()
  for model in config.model_config_list.config:
    if not model.name:
      raise errors.invalid_argument("ModelConfig has an empty name")
    if model.name in seen:
      raise errors.invalid_argument(f"Illegal to list model {model.name} multiple times in config list")
    seen.add(model.name)
    if not model.base_path:
      raise errors.invalid_argument(f"Model {model.name} has no base_path")
    if "\0" in model.base_path:  # No file system path holds one: refuse it before anything changes.
      raise errors.invalid_argument(f"Model {model.name} base_path {model.base_path!r} holds a NUL byte")
    if is_relative_path(model.base_path):
      # As TF Serving: relative to what? The server's working directory means nothing to a config
      # file elsewhere, nor to a client sending HandleReloadConfigRequest.
      raise errors.invalid_argument(
        f"Expected model {model.name} to have an absolute path or URI; got base_path()={model.base_path}"
      )
    if model.model_platform not in ("", _TENSORFLOW_PLATFORM):
      raise errors.invalid_argument(f"Model {model.name} requests unsupported platform {model.model_platform}")
    if model.model_type:
      raise errors.invalid_argument(f"ModelServerConfig::model_type choice {model.model_type} not supported.")


# How often a reload waiting for loads checks whether the server is stopping.
_SHUTDOWN_CHECK_SECONDS = 0.2

# Removed models whose versions' states GetModelStatus still reports (the oldest are forgotten).
REMOVED_MODELS_KEPT = 1000


def _unavailable_label_error(name: str, version: int) -> errors.ServingError:
  return errors.failed_precondition(
    f"Request to assign label to version {version} of model {name}, which is not currently available for inference"
  )


class ServerCore:
  """Holds one ModelManager per configured model.

  Args:
    loader_options: How versions are loaded.
    num_load_threads: Load concurrency (TF Serving's 0 means serial: 1).
    num_unload_threads: Unload concurrency (0 means 1).
    allow_version_labels_for_unavailable_models: Accept labels pointing at
      versions that are not AVAILABLE.
    router: Told each model's AVAILABLE versions and labels whenever either
      changes. A version leaves it before its unload begins, and a new one
      joins once loaded and warmed, so the router keeps serving through a
      swap, as `servable_handle` does.
  """

  def __init__(
    self,
    loader_options: loader.LoaderOptions,
    num_load_threads: int = 0,
    num_unload_threads: int = 0,
    allow_version_labels_for_unavailable_models: bool = False,
    router: Router | None = None,
  ):
    self._loader_options = loader_options
    self._load_pool = concurrent.futures.ThreadPoolExecutor(max(1, num_load_threads), thread_name_prefix="load")
    self._unload_pool = concurrent.futures.ThreadPoolExecutor(max(1, num_unload_threads), thread_name_prefix="unload")
    self._allow_unavailable_labels = allow_version_labels_for_unavailable_models
    self._policy = aspired_versions_policy.AvailabilityPreservingPolicy()
    self._lock = threading.RLock()
    self._reload_lock = threading.Lock()
    self._managers: dict[str, model_manager.ModelManager] = {}
    # Models the config no longer lists, newest last, for GetModelStatus: as TF Serving's
    # ServableStateMonitor, their versions stay visible (UNLOADING, then END).
    self._removed: collections.OrderedDict[str, model_manager.ModelManager] = collections.OrderedDict()
    self._labels: dict[str, dict[str, int]] = {}
    # Set once the server stops: polls end, and reloads stop waiting for loads (see `shut_down`).
    self._stop_polling = threading.Event()
    self._poll_errors: dict[str, str] = {}  # Per model, the last poll's error (logged once).
    self._poll_thread: threading.Thread | None = None
    self._config = model_server_config_pb2.ModelServerConfig()
    self._router = router
    # What the router was told: per model, its AVAILABLE versions and labels.
    self._route_lock = threading.Lock()
    self._routed_versions: dict[str, dict[int, saved_model_bundle.LoadedVersion]] = {}
    self._routed_labels: dict[str, dict[str, int]] = {}

  @property
  def config(self) -> model_server_config_pb2.ModelServerConfig:
    """The last config `reload_config` began to apply (one refused before
    any change is not)."""
    return self._config

  def reload_config(self, config: model_server_config_pb2.ModelServerConfig, wait: bool = True) -> None:
    """Transitions to `config`: adds, updates and removes models.

    Waits until the new config's versions have loaded (or failed), then
    applies its version labels, as TF Serving's ReloadConfig does. A label
    that can't end up on an AVAILABLE version (see `_check_labels`) refuses
    the config before anything changes.

    Raises:
      ServingError: if the config is invalid, a model has no loadable
        version, or a label names an unavailable version.
    """
    if config.WhichOneof("config") is None and self._config.WhichOneof("config") is None:
      # As TF Serving: a server may start with an empty config (no model yet); a later config adds
      # models. An empty config replacing a model_config_list is refused (`_validate`).
      logging.info("Taking no action for empty config.")
      return
    _validate(config)
    for model in config.model_config_list.config:
      loader.check_path_roots(model.base_path, self._loader_options.allowed_roots, f"Model {model.name} base_path")
    with self._reload_lock:
      models = {}
      for model in config.model_config_list.config:
        copy = model_server_config_pb2.ModelConfig()
        copy.CopyFrom(model)
        if os.path.isabs(model.base_path):
          copy.base_path = os.path.normpath(model.base_path)
        models[model.name] = copy
      if wait:  # Else (start-up) the labels apply, and are checked, by the next reload.
        self._check_labels(models)
      self._config = model_server_config_pb2.ModelServerConfig()
      self._config.CopyFrom(config)
      with self._lock:
        removed = [m for n, m in self._managers.items() if n not in models]
        for manager in removed:
          del self._managers[manager.name]
          self._labels.pop(manager.name, None)
          self._set_route_labels(manager.name, {})
          self._removed.pop(manager.name, None)
          self._removed[manager.name] = manager
          while len(self._removed) > REMOVED_MODELS_KEPT:
            self._removed.popitem(last=False)
        added, updated = [], []
        for name, model in models.items():
          manager = self._managers.get(name)
          if manager is None:
            manager = model_manager.ModelManager(
              model,
              self._loader_options,
              self._load_pool,
              self._unload_pool,
              self._policy,
              self._route_versions if self._router is not None else None,
            )
            self._managers[name] = manager
            self._removed.pop(name, None)
            added.append(manager)
          else:
            updated.append((manager, model))
      for manager in removed:
        logging.info("Removing model %s", manager.name)
        manager.stop()
      for manager in added:
        logging.info("Adding model %s from %s", manager.name, manager.config.base_path)
        manager.poll()
      for manager, model in updated:
        manager.update_config(model)
      logging.info("Finished adding/updating models")
      if not wait:
        return
      for manager in list(added) + [m for m, _ in updated]:
        # As TF Serving, a new model is waited for through its load retries; a model already
        # configured only until each new version served or failed once (the old one serves on).
        wait_for_loads = manager.wait_until_settled if manager in added else manager.wait_until_tried
        while not wait_for_loads(timeout=_SHUTDOWN_CHECK_SECONDS):
          if self._stop_polling.is_set():
            raise errors.unavailable("The server is shutting down: the config reload stopped waiting for its loads")
        if manager.has_aspired() and not manager.available_versions():
          error = manager.first_error()
          if error is not None:
            raise error
      self._apply_labels(models)

  def _label_may_name_unavailable(self, name: str, label: str, version: int) -> bool:
    """--allow_version_labels_for_unavailable_models lets a new label, or
    one left as it is, name a version not AVAILABLE; as in TF Serving, never
    one moved to another version, whose clients would lose their answers."""
    if not self._allow_unavailable_labels:
      return False
    with self._lock:
      return self._labels.get(name, {}).get(label, version) == version

  def _refuse_labels_outside(self, name: str, labels: Mapping[str, int], versions: set[int]) -> None:
    """Raises FAILED_PRECONDITION for the first label (by name) naming a
    version outside `versions` that it may not name (see
    `_label_may_name_unavailable`)."""
    for label, version in sorted(labels.items()):
      if version not in versions and not self._label_may_name_unavailable(name, label, version):
        raise _unavailable_label_error(name, version)

  def _check_labels(self, models: dict[str, model_server_config_pb2.ModelConfig]) -> None:
    """Refuses, before the config changes anything, a label whose version
    can't be AVAILABLE once the reload is done: one not on disk, or that the
    new version policy unloads (e.g. `latest` while a label keeps an older
    version). Checked only after the loads, as TF Serving does, the refusal
    would come with the models already changed and the label left dangling.
    A version that then fails to load is caught by `_apply_labels`."""
    for name, model in models.items():
      if not model.version_labels:
        continue
      with self._lock:
        manager = self._managers.get(name)
      available = set(manager.available_versions()) if manager else set()
      on_disk = file_system_source.list_versions(model.base_path)
      # As ModelManager.poll: a base path without versions, or a `specific` policy naming none on
      # disk, keeps what serves.
      aspired = file_system_source.aspired_versions(on_disk, model) if on_disk else set()
      reachable = aspired or available
      self._refuse_labels_outside(name, model.version_labels, reachable)

  def _apply_labels(self, models) -> None:
    labels = {}
    for name, model in models.items():
      manager = self._managers.get(name)
      available = set(manager.available_versions()) if manager else set()
      self._refuse_labels_outside(name, model.version_labels, available)
      labels[name] = dict(model.version_labels)
    with self._lock:
      self._labels = labels
    for name in models:
      self._set_route_labels(name, labels[name])

  def _route_versions(self, name: str, versions: dict[int, saved_model_bundle.LoadedVersion]) -> None:
    """ModelManager's on_available: tells the router (under the manager's
    lock, so a version leaves the router before its unload begins)."""
    with self._route_lock:
      if versions:
        self._routed_versions[name] = versions
      else:
        self._routed_versions.pop(name, None)
      self._router.set_model(name, versions, self._routed_labels.get(name, {}))

  def _set_route_labels(self, name: str, labels: dict[str, int]) -> None:
    """Tells the router a model's labels, if they changed."""
    if self._router is None:
      return
    with self._route_lock:
      if self._routed_labels.get(name, {}) == labels:
        return
      if labels:
        self._routed_labels[name] = dict(labels)
      else:
        self._routed_labels.pop(name, None)
      versions = self._routed_versions.get(name)
      if versions:  # Else the labels go with the model's first versions.
        self._router.set_model(name, versions, dict(labels))

  def wait_until_models_available(self, stop: threading.Event | None = None) -> None:
    """Blocks until every model has an AVAILABLE version (start-up).

    A model without any version on disk is waited for, as TF Serving does;
    `stop` (e.g. set by SIGTERM) ends the wait.

    Raises:
      ServingError: if a model's aspired versions all failed to load.
    """
    for manager in self.managers():
      while not manager.available_versions():
        if stop is not None and stop.is_set():
          return
        manager.wait_until_settled(timeout=0.5)
        if manager.settled() and manager.has_aspired() and (not manager.available_versions()):
          error = manager.first_error()
          if error is not None:
            raise error

  def managers(self):
    with self._lock:
      return list(self._managers.values())

  def poll(self) -> None:
    """Checks every model's base path for new or removed versions."""
    for manager in self.managers():
      try:
        manager.poll()
      except Exception as e:  # A broken base path must not stop other models, or later polls.
        text = f"{type(e).__name__}: {e}"
        if self._poll_errors.get(manager.name) != text:  # Once per distinct error, not every poll.
          logging.exception("Polling model %s failed (logged again only when the error changes)", manager.name)
        self._poll_errors[manager.name] = text
      else:
        if self._poll_errors.pop(manager.name, None) is not None:
          logging.info("Polling model %s works again", manager.name)

  def start_polling(self, wait_seconds: float) -> None:
    """Polls the file system every `wait_seconds` (0: only at start-up)."""
    if wait_seconds <= 0:
      return

    def run():
      while not self._stop_polling.wait(wait_seconds):
        try:
          self.poll()
        except Exception:  # The thread must outlive any one poll.
          logging.exception("Polling the models' base paths failed")

    self._poll_thread = threading.Thread(target=run, name="fs-poll", daemon=True)
    self._poll_thread.start()

  def has_model(self, name: str) -> bool:
    """Whether `name` is a model of the current config (whatever its versions' states)."""
    with self._lock:
      return name in self._managers

  def _manager(self, name: str, request_text: str) -> model_manager.ModelManager:
    with self._lock:
      manager = self._managers.get(name)
    if manager is None:
      raise errors.not_found(f"Servable not found for request: {request_text}")
    return manager

  def resolve(self, model_spec: model_pb2.ModelSpec):
    """Returns (manager, version or None, request text) for a ModelSpec."""
    name = model_spec.name
    version = self._requested_version(model_spec)
    text = f"Latest({name})" if version is None else (f"Specific({name}, {version})")
    return self._manager(name, text), version, text

  def _requested_version(self, model_spec: model_pb2.ModelSpec) -> int | None:
    """The version a ModelSpec names (by number or label), None for the latest."""
    name = model_spec.name
    if not name:
      raise errors.invalid_argument("ModelSpec has no name specified.")
    choice = model_spec.WhichOneof("version_choice")
    version = None
    if choice == "version":
      version = model_spec.version.value
    elif choice == "version_label":
      with self._lock:
        version = self._labels.get(name, {}).get(model_spec.version_label)
      if version is None:
        raise errors.invalid_argument(f"Unrecognized servable version label: {model_spec.version_label}").with_context(
          f"model: {name}"
        )
    return version

  @contextlib.contextmanager
  def servable_handle(self, model_spec: model_pb2.ModelSpec) -> Iterator[saved_model_bundle.LoadedVersion]:
    """Yields the servable a ModelSpec names, held until the block exits."""
    manager, version, text = self.resolve(model_spec)
    with manager.handle(text, version) as bundle:
      yield bundle

  def model_status(self, model_spec: model_pb2.ModelSpec) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus for a ModelSpec (one version or all of them), of a
    configured model or of one removed from the config."""
    name = model_spec.name
    if name:
      version = self._requested_version(model_spec)
    else:  # As TF Serving's GetModelStatus: no model has an empty name, so none is found.
      version = model_spec.version.value if model_spec.WhichOneof("version_choice") == "version" else None
    with self._lock:
      manager = self._managers.get(name) or self._removed.get(name)
    states = manager.version_states() if manager else []
    response = get_model_status_pb2.GetModelStatusResponse()
    if version is not None:
      states = [s for s in states if s[0] == version]
      if not states:
        raise errors.not_found(f"Could not find version {version} of model {name}")
    elif not states:
      raise errors.not_found(f"Could not find any versions of model {name}")
    # Newest first, as TF Serving's ServableStateMonitor orders versions.
    for v, state, error in sorted(states, key=lambda s: -s[0]):
      status = response.model_version_status.add(version=v, state=state)
      status.status.SetInParent()  # OK is reported explicitly, as TF Serving.
      if error is not None:
        status.status.CopyFrom(error.to_status_proto())
    return response

  def shut_down(self) -> None:
    """Stops polling, and ends reloads waiting for loads (UNAVAILABLE), at
    once: a reload waiting for a new model's load retries (minutes) would
    otherwise hold a graceful stop, whose front ends wait for the calls
    they run, until the last retry."""
    self._stop_polling.set()

  def stop(self, timeout: float = 30.0) -> None:
    """Stops polling and unloads every model."""
    self.shut_down()
    managers = self.managers()
    for manager in managers:
      manager.stop()
    for manager in managers:
      manager.wait_until_unloaded(timeout)
    # Queued loads still run, but return at once once their manager stopped.
    self._load_pool.shutdown(wait=False)
    self._unload_pool.shutdown(wait=False)

  def loads_in_progress(self) -> list[str]:
    """The versions still loading, of configured and removed models (after `stop`: the loads it left
    running)."""
    with self._lock:
      managers = [*self._managers.values(), *self._removed.values()]
    return [
      saved_model_bundle.servable_context(manager.name, version)
      for manager in managers
      for version in manager.loading_versions()
    ]
