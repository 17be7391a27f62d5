"""A shared batch scheduler: many queues, one pool of batch threads.

Follows TF Serving's SharedBatchScheduler: each queue collects tasks into
batches of at most `max_batch_size`; a batch is handed to a free batch thread
once it is full or its oldest task has waited `batch_timeout_micros`; a queue
holding `max_enqueued_batches` batches rejects new tasks with UNAVAILABLE.
TF Serving's scheduler is C++ and not exposed to Python, hence this module.
"""

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from serving import errors

# The longest a batch waits for more tasks: 10^15 us, about 31 years, "until full" in practice.
# TF Serving accepts any int64 batch_timeout_micros, but a deadline that far off overflows a
# nanosecond clock (the native scheduler's) and Python's longest wait (threading.TIMEOUT_MAX).
MAX_BATCH_TIMEOUT_MICROS = 10**15


@dataclasses.dataclass(frozen=True)
class QueueOptions:
  """Per-queue batching options (TF Serving's BatchingParameters).

  Attributes:
    max_batch_size: Largest batch, in rows (dim-0 elements).
    batch_timeout_micros: How long the oldest task may wait for more tasks.
    max_enqueued_batches: Queue capacity in batches; beyond it, UNAVAILABLE.
    allowed_batch_sizes: If set, batches are padded up to one of these sizes.
    pad_variable_length_inputs: Pad inputs whose per-row shapes differ to one
      shape so they batch together (native batching only, see
      batching_session.queue_options_from_proto).
  """

  max_batch_size: int = 1000
  batch_timeout_micros: int = 0
  max_enqueued_batches: int = 10
  allowed_batch_sizes: tuple = ()
  pad_variable_length_inputs: bool = False


class Task:
  """One request's share of a batch, completed by a batch thread.

  A caller either blocks in `wait` or, on an asyncio loop, awaits
  `wait_async`; the latter is woken by one callback per batch and loop (see
  `finish_all`), not by a thread of its own.

  Args:
    size: Rows (dim-0 elements) the task adds to its batch.
    payload: What the batch's processor needs (e.g. feeds and a timeout).
    loop: The running event loop of an asyncio caller, else None.
    elements: Tensor elements the task adds to its batch.
    nbytes: Bytes the task adds to its batch.
  """

  def __init__(
    self, size: int, payload: Any, loop: asyncio.AbstractEventLoop | None = None, elements: int = 0, nbytes: int = 0
  ):
    self.size = size
    self.elements = elements
    self.nbytes = nbytes
    self.payload = payload
    self.result: Any = None
    self.error: BaseException | None = None
    self.abandoned = False  # Its caller gave up (deadline); skip its rows.
    self._done = threading.Event()
    self.loop = loop
    self._future = loop.create_future() if loop is not None else None

  def set_outcome(self, result: Any, error: BaseException | None) -> None:
    """Records the outcome and releases blocking waiters (not async ones)."""
    self.result, self.error = result, error
    self._done.set()

  def wake(self) -> None:
    """Completes the asyncio future; runs on the task's loop."""
    if not self._future.done():
      self._future.set_result(None)

  def finish(self, result: Any = None, error: BaseException | None = None) -> None:
    self.set_outcome(result, error)
    if self.loop is not None:
      _call_soon(self.loop, self.wake)

  def done(self) -> bool:
    return self._done.is_set()

  def _outcome(self) -> Any:
    if self.error is not None:
      raise self.error
    return self.result

  def _expired(self, timeout_ms: int | None) -> errors.ServingError:
    self.abandoned = True
    return errors.deadline_exceeded(f"Deadline of {timeout_ms} ms exceeded while waiting for a batch")

  def wait(self, timeout_ms: int | None = None) -> Any:
    """Blocks until processed; returns the result or raises the error.

    Raises:
      ServingError: DEADLINE_EXCEEDED if `timeout_ms` passes first; the task
        is then abandoned and left out of the batch it waits in.
    """
    if not self._done.wait(None if timeout_ms is None else timeout_ms / 1e3):
      raise self._expired(timeout_ms)
    return self._outcome()

  async def wait_async(self, timeout_ms: int | None = None) -> Any:
    """`wait` for a task created with a loop, awaited on that loop."""
    future = self._future
    timer = None
    if timeout_ms is not None and not future.done():
      timer = self.loop.call_later(
        timeout_ms / 1e3, lambda: future.done() or future.set_exception(self._expired(timeout_ms))
      )
    try:
      await future
    except asyncio.CancelledError:  # The RPC ended: leave its rows out.
      self.abandoned = True
      raise
    finally:
      if timer is not None:
        timer.cancel()
    return self._outcome()


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
  try:
    loop.call_soon_threadsafe(callback, *args)
  except RuntimeError:  # The loop closed: its waiters are gone.
    pass


def _wake_all(tasks: Sequence[Task]) -> None:
  for task in tasks:
    task.wake()


def finish_all(tasks: Sequence[Task], results: Sequence[Any]) -> None:
  """Completes a batch's tasks with one loop callback per event loop.

  Waking each asyncio waiter separately would cost one self-pipe write and
  loop wake-up per task; a batch of 32 needs only one.
  """
  waiting: dict[asyncio.AbstractEventLoop, list[Task]] = {}
  for task, result in zip(tasks, results):
    task.set_outcome(result, None)
    if task.loop is not None:
      waiting.setdefault(task.loop, []).append(task)
  for loop, woken in waiting.items():
    _call_soon(loop, _wake_all, woken)


class _Batch:
  def __init__(self):
    self.tasks: list[Task] = []
    self.size = 0
    self.elements = 0
    self.nbytes = 0
    self.created = time.monotonic()
    self.closed = False


class BatchQueue:
  """A queue of batches for one kind of task, served by the shared threads.

  Besides `max_batch_size` rows, a batch holds at most `max_elements` tensor
  elements and `max_bytes` bytes (None: no limit): a task that would cross
  one starts the next batch, and a task over one by itself fails with
  RESOURCE_EXHAUSTED.
  """

  def __init__(
    self,
    scheduler: "SharedBatchScheduler",
    options: QueueOptions,
    process_batch: Callable[[list[Task]], None],
    max_elements: int | None = None,
    max_bytes: int | None = None,
  ):
    self._scheduler = scheduler
    self._process_batch = process_batch
    self._batches: collections.deque[_Batch] = collections.deque()
    # What one batch may hold.
    self.options = options
    self.max_elements = max_elements
    self.max_bytes = max_bytes

  def schedule(self, task: Task) -> None:
    """Enqueues `task`; raises if it is too large or the queue is full."""
    options = self.options
    if task.size > options.max_batch_size:
      raise errors.invalid_argument(
        f"Task size {task.size} is larger than maximum input batch size {options.max_batch_size}"
      )
    for amount, limit, unit, flag in (
      (task.elements, self.max_elements, "elements", "--max_elements_per_batch"),
      (task.nbytes, self.max_bytes, "bytes", "--max_bytes_per_batch"),
    ):
      if limit is not None and amount > limit:
        raise errors.resource_exhausted(
          f"Task of {amount} {unit} is larger than the maximum of {limit} "
          f"{unit} per batch (derived from the inputs' shapes at "
          f"max_batch_size rows unless set); raise {flag} to allow it",
          http_status=413,
        )
    with self._scheduler.cond:
      if self._scheduler.stopped:
        raise errors.unavailable("Batch scheduler is shutting down")
      last = self._batches[-1] if self._batches else None
      # Batch threads only need waking when a batch opens (a new deadline)
      # or closes (ready now); adding to an open batch changes neither.
      changed = False
      if (
        last is None
        or last.closed
        or (last.size + task.size > options.max_batch_size)
        or (self.max_elements is not None and last.elements + task.elements > self.max_elements)
        or (self.max_bytes is not None and last.nbytes + task.nbytes > self.max_bytes)
      ):
        if last is not None:
          last.closed = True
        if len(self._batches) >= options.max_enqueued_batches:
          raise errors.unavailable("The batch scheduling queue to which this task was submitted is full")
        last = _Batch()
        self._batches.append(last)
        changed = True
      last.tasks.append(task)
      last.size += task.size
      last.elements += task.elements
      last.nbytes += task.nbytes
      if last.size >= options.max_batch_size:
        last.closed = True
        changed = True
      if changed:
        self._scheduler.cond.notify()

  def ready_at(self) -> float | None:
    """Monotonic time at which the head batch may run (caller holds lock)."""
    if not self._batches:
      return None
    head = self._batches[0]
    if head.closed:
      return head.created
    return head.created + self.options.batch_timeout_micros / 1e6

  def pop_batch(self) -> _Batch:
    batch = self._batches.popleft()
    batch.closed = True
    return batch

  def process(self, tasks: list[Task]) -> None:
    """Runs one batch (called by a batch thread)."""
    self._process_batch(tasks)

  def empty(self) -> bool:
    with self._scheduler.cond:
      return not self._batches


class SharedBatchScheduler:
  """Owns the batch threads shared by all queues.

  Args:
    num_batch_threads: Number of threads processing batches.
  """

  def __init__(self, num_batch_threads: int):
    self.cond = threading.Condition()
    self.stopped = False
    self.draining = False
    self._queues: list[BatchQueue] = []
    self._threads = [
      threading.Thread(target=self._work, name=f"batch-{i}", daemon=True) for i in range(max(1, num_batch_threads))
    ]
    for thread in self._threads:
      thread.start()

  def add_queue(
    self,
    options: QueueOptions,
    process_batch: Callable[[list[Task]], None],
    max_elements: int | None = None,
    max_bytes: int | None = None,
  ) -> BatchQueue:
    """Creates a queue whose batches go to `process_batch(tasks)` (limits:
    see BatchQueue)."""
    queue = BatchQueue(self, options, process_batch, max_elements, max_bytes)
    with self.cond:
      self._queues.append(queue)
    return queue

  def remove_queue(self, queue: BatchQueue) -> None:
    """Forgets a queue once its servable is unloaded (it must be empty)."""
    with self.cond:
      if queue in self._queues:
        self._queues.remove(queue)

  def drain(self) -> None:
    """Runs every batch as soon as a thread is free, without waiting out
    batch_timeout_micros: from the start of a shutdown, whose grace would
    otherwise run out on calls waiting for a batch to fill."""
    with self.cond:
      self.draining = True
      self.cond.notify_all()

  def stop(self) -> None:
    """Lets the threads finish queued batches, then exit."""
    with self.cond:
      self.stopped = True
      self.cond.notify_all()
    for thread in self._threads:
      thread.join(timeout=30)

  def _next_batch(self):
    """Waits for the oldest ready batch; None once stopped and drained."""
    with self.cond:
      while True:
        now = time.monotonic()
        best, best_at, next_wake = None, None, None
        for queue in self._queues:
          ready_at = queue.ready_at()
          if ready_at is None:
            continue
          if ready_at <= now or self.stopped or self.draining:
            if best is None or ready_at < best_at:
              best, best_at = queue, ready_at
          elif next_wake is None or ready_at < next_wake:
            next_wake = ready_at
        if best is not None:
          return best, best.pop_batch()
        if self.stopped:
          return None
        self.cond.wait(None if next_wake is None else min(next_wake - now, threading.TIMEOUT_MAX))

  def _work(self) -> None:
    last_error = None
    while True:
      try:
        item = self._next_batch()
      except Exception as e:  # A batch thread that died would leave its queues' tasks waiting forever.
        if repr(e) != last_error:
          logging.exception("Batch thread failed to take a batch; retrying")
        last_error = repr(e)
        time.sleep(0.1)
        continue
      last_error = None
      if item is None:
        return
      queue, batch = item
      try:
        queue.process(batch.tasks)
      except BaseException as e:  # Never lose a task: fail them all.
        logging.exception("Batch processing failed")
        for task in batch.tasks:
          if not task.done():
            task.finish(error=errors.from_exception(e))
