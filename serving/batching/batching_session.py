"""Wraps a session runner so concurrent calls are merged along dim 0.

Like TF Serving's BatchingSession: calls with the same feeds, fetches and
per-row shapes share a queue; a batch concatenates their inputs along the
first dimension (padded up to an allowed batch size by repeating the first
row), runs once, and slices every output back per call.
"""

import asyncio
import bisect
import dataclasses
import threading
from collections.abc import Callable, Sequence

import grpc
import numpy as np
from absl import logging

from serving import errors
from serving.batching import batch_scheduler
from serving.servables import saved_model_bundle

BatchObserver = Callable[[int, int], None]  # (batch rows, padding rows)
# Feed tensor names -> (elements, bytes) a batch of them may hold (None: any).
BatchBudget = Callable[[Sequence[str]], tuple[int | None, int | None]]

# Most kinds of calls (feed shapes x fetches) one servable batches.
MAX_QUEUES = 64

_NO_RETRY = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


class BatchingSession:
  """A SessionRunner that batches concurrent calls.

  Args:
    runner: The underlying (unbatched) session runner.
    scheduler: Shared scheduler providing batch threads.
    options: Queue options for every queue of this session.
    observer: Called with (rows, padding) for each processed batch.
    budget: Limits each queue's batches by elements and bytes (see
      request_limits.ExpansionLimits.batch_budget); None: rows only.
  """

  def __init__(
    self,
    runner: saved_model_bundle.SessionRunner,
    scheduler: batch_scheduler.SharedBatchScheduler,
    options: batch_scheduler.QueueOptions,
    observer: BatchObserver | None = None,
    budget: BatchBudget | None = None,
  ):
    self._runner = runner
    self._budget = budget
    self._scheduler = scheduler
    self._options = options
    self._observer = observer
    self._queues: dict[tuple, batch_scheduler.BatchQueue] = {}
    # Calls whose outputs turned out not to be per-row (e.g. scalars).
    self._unbatchable: set[tuple] = set()
    self._lock = threading.Lock()

  def __call__(
    self, feeds: dict[str, np.ndarray], fetches: Sequence[str], timeout_ms: int | None = None
  ) -> list[np.ndarray]:
    task = self.schedule(feeds, fetches, timeout_ms)
    if task is None:
      return self._runner(feeds, fetches, timeout_ms)
    return task.wait(timeout_ms)

  def schedule(
    self,
    feeds: dict[str, np.ndarray],
    fetches: Sequence[str],
    timeout_ms: int | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
  ) -> batch_scheduler.Task | None:
    """Enqueues a call and returns its task, or None if it can't be batched.

    Args:
      feeds: Feeds by tensor name.
      fetches: Tensor names to fetch.
      timeout_ms: The call's deadline, if any.
      loop: For an asyncio caller, its running loop (see Task.wait_async).

    Returns:
      The queued task; None for calls to run unbatched with `runner`
      (scalar feeds, feeds disagreeing on dim 0, empty batches, calls whose
      outputs are not per-row, or past MAX_QUEUES kinds of calls).

    Raises:
      ServingError: INVALID_ARGUMENT if the call exceeds max_batch_size,
        UNAVAILABLE if its queue is full.
    """
    rows = {a.shape[0] if a.ndim else None for a in feeds.values()}
    if len(rows) != 1 or None in rows:
      # Scalars or feeds disagreeing on dim 0 can't be split back per call;
      # run them on their own rather than reject them.
      return None
    size = rows.pop()
    if size == 0:
      return None
    key = (tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())), tuple(fetches))
    queue = None if key in self._unbatchable else self._queue(key)
    if queue is None:
      return None
    elements, nbytes = _feeds_cost(feeds) if self._budget else (0, 0)
    task = batch_scheduler.Task(size, (feeds, timeout_ms), loop, elements, nbytes)
    queue.schedule(task)
    return task

  @property
  def runner(self) -> saved_model_bundle.SessionRunner:
    """The underlying unbatched runner."""
    return self._runner

  def _queue(self, key: tuple) -> batch_scheduler.BatchQueue | None:
    """The queue for `key`; None (run unbatched) past MAX_QUEUES kinds."""
    with self._lock:
      queue = self._queues.get(key)
      if queue is None:
        if len(self._queues) >= MAX_QUEUES:
          # Each distinct feed shape gets a queue that batch threads scan;
          # bound them so odd shapes can't slow every batch down.
          return None
        max_elements, max_bytes = self._budget([name for name, _, _ in key[0]]) if self._budget else (None, None)
        queue = self._scheduler.add_queue(
          self._options, lambda tasks: self._process(key, tasks), max_elements, max_bytes
        )
        self._queues[key] = queue
      return queue

  def close(self) -> None:
    """Detaches this session's queues from the shared scheduler."""
    with self._lock:
      for queue in self._queues.values():
        self._scheduler.remove_queue(queue)
      self._queues.clear()

  def _padded_size(self, rows: int) -> int:
    allowed = self._options.allowed_batch_sizes
    if not allowed:
      return rows
    index = bisect.bisect_left(allowed, rows)
    return allowed[index] if index < len(allowed) else rows

  def _process(self, key: tuple, tasks: list[batch_scheduler.Task]) -> None:
    tasks = [t for t in tasks if not t.abandoned]  # Past their deadline.
    if not tasks:
      return
    fetches = key[1]
    rows = sum(t.size for t in tasks)
    padded = self._padded_size(rows)
    names = list(tasks[0].payload[0].keys())
    feeds = {}
    for name in names:
      parts = [t.payload[0][name] for t in tasks]
      if padded > rows:
        first = parts[0][:1]
        parts.append(np.repeat(first, padded - rows, axis=0))
      feeds[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    timeouts = [t.payload[1] for t in tasks]
    timeout = None if None in timeouts else max(timeouts)
    try:
      outputs = self._runner(feeds, fetches, timeout)
    except Exception as e:  # Whatever failed, retry the calls one by one.
      self._run_alone(fetches, tasks, errors.from_exception(e))
      return
    if any(np.ndim(o) == 0 or o.shape[0] != padded for o in outputs):
      # TF Serving fails such calls ("Batched output tensor's 0th dimension
      # does not equal the sum of the 0th dimension sizes of the input
      # tensors"); we stop batching them and answer each call on its own.
      logging.warning("Outputs %s are not per-row; not batching these calls", list(fetches))
      self._unbatchable.add(key)
      self._run_alone(fetches, tasks)
      return
    if self._observer is not None:
      self._observer(rows, padded - rows)
    results, offset = [], 0
    for task in tasks:
      results.append([o[offset : offset + task.size] for o in outputs])
      offset += task.size
    batch_scheduler.finish_all(tasks, results)

  def _run_alone(
    self, fetches: Sequence[str], tasks: list[batch_scheduler.Task], error: errors.ServingError | None = None
  ) -> None:
    """Runs each call of a failed batch by itself.

    One malformed call (say, an unparsable tf.Example) then fails alone
    instead of failing every call it was batched with. Deadline, cancel and
    unavailability errors are not retried.
    """
    if error is not None and (len(tasks) == 1 or error.code in _NO_RETRY):
      for task in tasks:
        task.finish(error=error)
      return
    for task in tasks:
      feeds, timeout_ms = task.payload
      try:
        task.finish(self._runner(feeds, fetches, timeout_ms))
      except Exception as e:  # Reported to this call's client only.
        task.finish(error=errors.from_exception(e))


def _feeds_cost(feeds: dict[str, np.ndarray]) -> tuple[int, int]:
  """(elements, bytes) of decoded feeds; strings count their lengths."""
  elements = nbytes = 0
  for array in feeds.values():
    elements += array.size
    if array.dtype == object:
      nbytes += sum(map(len, array.flat))
    else:
      nbytes += array.nbytes
  return elements, nbytes


def queue_options_from_proto(params, native: bool = False) -> batch_scheduler.QueueOptions:
  """Builds QueueOptions from a BatchingParameters message.

  Defaults follow TF Serving's BasicBatchScheduler: max_batch_size 1000,
  batch_timeout_micros 0, max_enqueued_batches 10.

  Args:
    params: The BatchingParameters.
    native: For the native data plane's batching, which implements
      pad_variable_length_inputs; this module's batching refuses it.
  """

  def value(field, default):
    return getattr(params, field).value if params.HasField(field) else default

  options = batch_scheduler.QueueOptions(
    max_batch_size=int(value("max_batch_size", 1000)),
    batch_timeout_micros=int(value("batch_timeout_micros", 0)),
    max_enqueued_batches=int(value("max_enqueued_batches", 10)),
    allowed_batch_sizes=tuple(int(s) for s in params.allowed_batch_sizes),
    pad_variable_length_inputs=bool(params.pad_variable_length_inputs),
  )
  if options.max_batch_size < 1 or options.max_enqueued_batches < 1:
    raise errors.invalid_argument("BatchingParameters: max_batch_size and max_enqueued_batches must be positive")
  if options.batch_timeout_micros < 0:
    raise errors.invalid_argument("BatchingParameters: batch_timeout_micros must be >= 0")
  if options.batch_timeout_micros > batch_scheduler.MAX_BATCH_TIMEOUT_MICROS:
    # As TF Serving, any int64 is accepted; beyond ~31 years it means "until the batch is full".
    options = dataclasses.replace(options, batch_timeout_micros=batch_scheduler.MAX_BATCH_TIMEOUT_MICROS)
  sizes = options.allowed_batch_sizes
  if sizes:
    if list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
      raise errors.invalid_argument("BatchingParameters: allowed_batch_sizes must be positive and strictly increasing")
    if sizes[-1] != options.max_batch_size:
      raise errors.invalid_argument(
        "BatchingParameters: the last entry in allowed_batch_sizes must equal max_batch_size"
      )
  if params.HasField("enable_large_batch_splitting") and (params.enable_large_batch_splitting.value):
    raise errors.invalid_argument(
      "BatchingParameters: enable_large_batch_splitting is not supported by "
      "fgr-serve; requests larger than max_batch_size are rejected"
    )
  if params.pad_variable_length_inputs and not native:
    raise errors.invalid_argument(
      "BatchingParameters: pad_variable_length_inputs needs the native data "
      "plane (--native); fgr-serve's Python batching batches requests with "
      "different per-row shapes separately instead"
    )
  return options
