"""Loads one version: SavedModel, optional batching, warm-up."""

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence

from tensorflow.core.protobuf import config_pb2

from serving import errors
from serving.batching import batch_scheduler, batching_session
from serving.servables import native_bundle, request_limits, saved_model_bundle, warmup


@dataclasses.dataclass
class BatchingConfig:
  """Server-wide batching set-up shared by every servable."""

  # The Python scheduler; with the native data plane, `_fgr_native.BatchScheduler`.
  scheduler: batch_scheduler.SharedBatchScheduler
  options: batch_scheduler.QueueOptions
  # Returns the per-batch observer for a model (e.g. a metrics recorder).
  observer_for: Callable[[str], batching_session.BatchObserver | None] = lambda name: None
  # Bounds each batch's elements and bytes; None: rows only.
  limits: request_limits.ExpansionLimits | None = None


@dataclasses.dataclass
class LoaderOptions:
  """How servables are loaded (TF Serving's loader and warm-up flags)."""

  tags: Sequence[str] = ("serve",)
  session_config: config_pb2.ConfigProto | None = None
  enable_warmup: bool = True
  warmup_iterations: int = 1
  # A failed load is tried again up to this many times, this far apart; the
  # manager schedules the retries and cancels them once the version is no
  # longer aspired (model_manager).
  max_num_load_retries: int = 5
  load_retry_interval_seconds: float = 60.0
  batching: BatchingConfig | None = None
  # If non-empty, model files must resolve (symlinks, "..") under one of these.
  allowed_roots: Sequence[str] = ()
  # Freed memory stays in the process (runtime.retain_freed_memory): rehearse
  # each model's first load, so the next version reuses touched pages.
  reserve_next_version_memory: bool = False
  # Set: versions load into the native data plane (native_bundle), which
  # also batches them.
  native: native_bundle.NativeRuntime | None = None


def check_path_roots(path: str, roots: Sequence[str], what: str) -> None:
  """Raises INVALID_ARGUMENT unless `path` resolves under one of `roots`.

  Both sides are resolved with os.path.realpath, so neither ".." nor a
  symlink can lead outside a root. No roots means no restriction.
  """
  if not roots:
    return
  real = os.path.realpath(path)
  for root in roots:
    real_root = os.path.realpath(root)
    if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
      return
  raise errors.invalid_argument(
    f"{what} {path} resolves to {real}, outside the allowed roots {{{','.join(roots)}}} (--model_base_path_roots)"
  )


def _native_bundle(name: str, version: int, path: str, options: LoaderOptions) -> native_bundle.NativeBundle:
  batching = None
  if options.batching is not None:
    batching = native_bundle.NativeBatching(options.batching.scheduler, options.batching.options)
  return native_bundle.NativeBundle(name, version, path, options.native, options.tags, options.session_config, batching)


def load_once(
  name: str, version: int, path: str, options: LoaderOptions, stop: threading.Event | None = None
) -> saved_model_bundle.LoadedVersion:
  """Loads and warms one version; raises ServingError on failure (CANCELLED once `stop` is set mid-warm-up)."""
  context = saved_model_bundle.servable_context(name, version)
  try:
    check_path_roots(path, options.allowed_roots, "Version directory")
    if options.native is not None:
      bundle = _native_bundle(name, version, path, options)
    else:
      bundle = saved_model_bundle.SavedModelBundle(name, version, path, options.tags, options.session_config)
  except Exception as e:  # Any load failure becomes the version's status.
    raise errors.from_exception(e, context) from e
  try:
    if options.batching is not None and options.native is None:
      batching = options.batching
      budget = (
        None
        if batching.limits is None
        else (batching.limits.batch_budget(bundle.signature_defs, batching.options.max_batch_size))
      )
      session = batching_session.BatchingSession(
        bundle.session_run, batching.scheduler, batching.options, batching.observer_for(name), budget
      )
      bundle.runner = session
      bundle.on_close(session.close)
    if options.enable_warmup:
      with saved_model_bundle.background_load():
        warmup.run_warmup(bundle, options.warmup_iterations, stop)
  except Exception as e:  # A failed warm-up fails the load, as in TF Serving.
    bundle.close()
    raise errors.from_exception(e, context) from e
  return bundle
