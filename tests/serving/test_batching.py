"""Server-side batching: scheduler semantics and an end-to-end server."""

import asyncio
import concurrent.futures
import re
import threading

import grpc
import numpy as np
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from serving import errors
from serving.batching import batch_scheduler, batching_session
from serving.config import protos


class _RecordingRunner:
  """A session runner computing y = 2x, recording each batch's rows as it
  starts; it then waits for `gate`."""

  def __init__(self):
    self.batches = []
    self.gate = threading.Event()
    self.gate.set()

  def __call__(self, feeds, fetches, timeout_ms=None):
    x = feeds["x:0"]
    self.batches.append(x.shape[0])
    self.gate.wait()
    return [x * 2 for _ in fetches]


def _queued_tasks(session) -> int:
  """Calls waiting in `session`'s batch queues."""
  return sum(
    len(batch.tasks)
    for queue in list(session._queues.values())  # pylint: disable=protected-access
    for batch in list(queue._batches)
  )  # pylint: disable=protected-access


@pytest.fixture
def scheduler():
  s = batch_scheduler.SharedBatchScheduler(num_batch_threads=1)
  yield s
  s.stop()


def test_merges_concurrent_calls_and_splits_back(scheduler, monkeypatch):
  runner = _RecordingRunner()
  runner.gate.clear()  # Calls queue up behind the first batch until all wait.
  processed = []  # Calls in each batch handed to the session.
  process = batch_scheduler.BatchQueue.process

  def counting_process(queue, tasks):
    processed.append(len(tasks))
    process(queue, tasks)

  monkeypatch.setattr(batch_scheduler.BatchQueue, "process", counting_process)
  observed = []
  session = batching_session.BatchingSession(
    runner,
    scheduler,
    batch_scheduler.QueueOptions(max_batch_size=8, batch_timeout_micros=0, allowed_batch_sizes=(4, 8)),
    observer=lambda rows, pad: observed.append((rows, pad)),
  )
  inputs = [np.full((1 + i % 2, 3), i, np.float32) for i in range(16)]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    futures = [pool.submit(session, {"x:0": x}, ["y:0"]) for x in inputs]
    try:
      lib.wait_for(lambda: sum(processed) + _queued_tasks(session) == 16, timeout=60)
    finally:
      runner.gate.set()
    outputs = [f.result(timeout=60) for f in futures]
  for x, (y,) in zip(inputs, outputs):
    np.testing.assert_array_equal(y, x * 2)  # Each caller gets its rows.
  assert len(runner.batches) < len(inputs)  # Calls were merged.
  assert set(runner.batches) <= {4, 8}  # Padded to allowed sizes.
  assert sum(rows for rows, _ in observed) == sum(len(x) for x in inputs)


def test_full_queue_is_unavailable_and_large_task_invalid(scheduler):
  runner = _RecordingRunner()
  runner.gate.clear()  # Hold the batch thread so the queue fills up.
  session = batching_session.BatchingSession(
    runner, scheduler, batch_scheduler.QueueOptions(max_batch_size=2, max_enqueued_batches=2)
  )
  x = np.ones((2, 1), np.float32)
  pool = concurrent.futures.ThreadPoolExecutor(8)
  futures = [pool.submit(session, {"x:0": x}, ["y:0"]) for _ in range(8)]
  lib.wait_for(lambda: any(f.done() for f in futures))
  runner.gate.set()
  codes = []
  for f in futures:
    try:
      f.result(timeout=60)
      codes.append("OK")
    except errors.ServingError as e:
      codes.append(e.code.name)
      assert "queue to which this task was submitted is full" in e.message
  assert "UNAVAILABLE" in codes and "OK" in codes
  with pytest.raises(errors.ServingError) as info:
    session({"x:0": np.ones((3, 1), np.float32)}, ["y:0"])
  assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert "larger than maximum input batch size 2" in info.value.message
  pool.shutdown()


def test_batching_parameters_validation():
  params = protos.BatchingParameters()
  params.max_batch_size.value = 16
  params.allowed_batch_sizes.extend([4, 8])
  with pytest.raises(errors.ServingError, match="must equal max_batch_size"):
    batching_session.queue_options_from_proto(params)
  params.allowed_batch_sizes.append(16)
  options = batching_session.queue_options_from_proto(params)
  assert options.allowed_batch_sizes == (4, 8, 16)
  assert options.max_enqueued_batches == 10  # TF Serving's default.
  assert not options.pad_variable_length_inputs
  # Padding variable-length inputs is native batching's alone.
  params.pad_variable_length_inputs = True
  with pytest.raises(errors.ServingError, match="pad_variable_length_inputs needs the native data plane"):
    batching_session.queue_options_from_proto(params)
  assert batching_session.queue_options_from_proto(params, native=True).pad_variable_length_inputs


@pytest.mark.usefixtures("native")
def test_server_with_batching(tmp_path):
  # A batch runs only once full (it would wait an hour otherwise): 16
  # concurrent callers and 64 requests fill 8 batches of 8, whatever the
  # machine's speed, and no caller is left waiting on a partial batch.
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.batching_server(
    tmp_path,
    "max_batch_size { value: 8 } "
    "batch_timeout_micros { value: 3600000000 } "
    "num_batch_threads { value: 1 } "
    "allowed_batch_sizes: 4 allowed_batch_sizes: 8",
  )
  try:

    def predict(i):
      request = predict_pb2.PredictRequest()
      request.model_spec.name = "m"
      request.inputs["x"].CopyFrom(tf.make_tensor_proto([float(i)], dtype=tf.float32))
      return server.predict.Predict(request, timeout=120).outputs["y"].float_val[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      results = list(pool.map(predict, range(64)))
    assert results == pytest.approx([0.5 * i + 2 for i in range(64)])
    text = server.server.metrics.exposition().decode()
    match = re.search(r'processed_batch_size_count\{model_name="m"\} (\S+)', text)
    assert float(match.group(1)) == 8  # Full batches only.
  finally:
    server.stop()


def test_bad_call_fails_alone_and_scalar_outputs_stop_batching(scheduler):
  def runner(feeds, fetches, timeout_ms=None):
    x = feeds["x:0"]
    if (x < 0).any():
      raise errors.invalid_argument("negative input")
    return [x * 2, np.float32(x.shape[0])]  # The second output is a scalar.

  session = batching_session.BatchingSession(
    runner, scheduler, batch_scheduler.QueueOptions(max_batch_size=8, batch_timeout_micros=50000)
  )
  inputs = [np.full((1, 1), v, np.float32) for v in (1, -1, 2, 3)]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = [pool.submit(session, {"x:0": x}, ["y:0", "n:0"]) for x in inputs]
    outcomes = []
    for f in futures:
      try:
        outcomes.append(float(f.result(timeout=60)[0][0, 0]))
      except errors.ServingError as e:
        outcomes.append(e.message)
  assert outcomes == [2.0, "negative input", 4.0, 6.0]
  y, n = session({"x:0": np.ones((3, 1), np.float32)}, ["y:0", "n:0"])
  assert n == 3.0 and y.shape == (3, 1)  # Ran unbatched from now on.


def test_queue_count_is_bounded(scheduler, monkeypatch):
  monkeypatch.setattr(batching_session, "MAX_QUEUES", 2)
  runner = _RecordingRunner()
  session = batching_session.BatchingSession(runner, scheduler, batch_scheduler.QueueOptions(max_batch_size=4))
  for width in (1, 2, 3, 4):  # Four kinds of calls, two queues at most.
    (y,) = session({"x:0": np.ones((1, width), np.float32)}, ["y:0"])
    assert y.shape == (1, width)
  assert len(session._queues) == 2  # pylint: disable=protected-access


def test_async_callers_share_a_batch_and_one_wake_up(scheduler, monkeypatch):
  runner = _RecordingRunner()
  # The batch runs when full: with no timeout, a batch thread woken by the first call could take the
  # calls queued so far whenever this thread is preempted before queueing the rest.
  session = batching_session.BatchingSession(
    runner, scheduler, batch_scheduler.QueueOptions(max_batch_size=8, batch_timeout_micros=60_000_000)
  )
  wake_ups = []
  real_call_soon = batch_scheduler._call_soon  # pylint: disable=protected-access

  def counting_call_soon(loop, callback, *args):
    wake_ups.append(callback)
    real_call_soon(loop, callback, *args)

  monkeypatch.setattr(batch_scheduler, "_call_soon", counting_call_soon)

  async def main():
    loop = asyncio.get_running_loop()
    tasks = [session.schedule({"x:0": np.full((1, 2), i, np.float32)}, ["y:0"], None, loop) for i in range(8)]
    return await asyncio.gather(*(t.wait_async(5000) for t in tasks))

  outputs = asyncio.run(main())
  for i, (y,) in enumerate(outputs):
    np.testing.assert_array_equal(y, np.full((1, 2), 2 * i, np.float32))
  assert runner.batches == [8]
  assert len(wake_ups) == 1  # One loop callback completed all eight calls.


def test_async_deadline_abandons_the_task(scheduler):
  runner = _RecordingRunner()
  session = batching_session.BatchingSession(
    runner,
    scheduler,  # A batch runs once full (or after an hour).
    batch_scheduler.QueueOptions(max_batch_size=4, batch_timeout_micros=3_600_000_000),
  )

  async def main():
    task = session.schedule({"x:0": np.ones((1, 1), np.float32)}, ["y:0"], 20, asyncio.get_running_loop())
    with pytest.raises(errors.ServingError) as info:
      await task.wait_async(20)  # Expires while the batch still collects.
    return task, info.value

  task, error = asyncio.run(main())
  assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
  assert task.abandoned
  # Three more rows fill the batch, which then runs without the first one.
  (y,) = session({"x:0": np.full((3, 1), 5, np.float32)}, ["y:0"])
  np.testing.assert_array_equal(y, np.full((3, 1), 10, np.float32))
  assert runner.batches == [3]  # Its row was left out of the batch.


def test_unbatchable_calls_are_not_scheduled(scheduler):
  session = batching_session.BatchingSession(_RecordingRunner(), scheduler, batch_scheduler.QueueOptions())
  assert session.schedule({"x:0": np.float32(1)}, ["y:0"]) is None
  assert session.schedule({"x:0": np.ones((1, 1)), "z:0": np.ones((2, 1))}, ["y:0"]) is None


@pytest.mark.usefixtures("native")
def test_the_largest_batch_timeout_waits_until_full(tmp_path):
  """TF Serving accepts any int64 batch_timeout_micros. INT64_MAX overflowed Python's longest wait
  (the batch threads died, and --native=off never finished starting) and the native scheduler's
  nanosecond clock (its batches ran at once). Capped, a batch waits until it is full."""
  params = protos.BatchingParameters()
  params.batch_timeout_micros.value = 2**63 - 1
  assert batching_session.queue_options_from_proto(params).batch_timeout_micros == (
    batch_scheduler.MAX_BATCH_TIMEOUT_MICROS
  )
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.batching_server(tmp_path, f"max_batch_size {{ value: 2 }} batch_timeout_micros {{ value: {2**63 - 1} }}")
  try:

    def request(x):
      r = predict_pb2.PredictRequest()
      r.model_spec.name = "m"
      r.inputs["x"].CopyFrom(tf.make_tensor_proto([x], dtype=tf.float32))
      return r

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # Two rows fill a batch.
      answers = list(pool.map(lambda x: server.predict.Predict(request(x), timeout=120), [1.0, 3.0]))
    assert [a.outputs["y"].float_val[0] for a in answers] == [2.5, 3.5]
    code, _ = lib.grpc_code(server.predict.Predict, request(1.0), timeout=1)  # Alone: never full.
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
  finally:
    server.stop()


def test_a_batch_thread_survives_a_failure_to_take_a_batch(scheduler, monkeypatch):
  """Whatever `_next_batch` raises, the thread logs it and goes on: queued calls still run."""
  failures = [RuntimeError("once")]
  next_batch = batch_scheduler.SharedBatchScheduler._next_batch  # pylint: disable=protected-access

  def failing_once(self):
    if failures:
      raise failures.pop()
    return next_batch(self)

  monkeypatch.setattr(batch_scheduler.SharedBatchScheduler, "_next_batch", failing_once)
  scheduler.stop()  # The fixture's threads already wait in the real `_next_batch`.
  fresh = batch_scheduler.SharedBatchScheduler(num_batch_threads=1)
  try:
    session = batching_session.BatchingSession(
      _RecordingRunner(), fresh, batch_scheduler.QueueOptions(max_batch_size=1)
    )
    x = np.array([[1.0]], np.float32)
    np.testing.assert_array_equal(session({"x:0": x}, ["y:0"])[0], x * 2)
    assert not failures
  finally:
    fresh.stop()


def _request_counts(server, model: str) -> dict[str, float]:
  text = server.server.metrics.exposition().decode()
  pattern = rf':tensorflow:serving:request_count_total\{{model_name="{model}",status="(\w+)"\}} (\S+)'
  return {status: float(count) for status, count in re.findall(pattern, text)}


@pytest.mark.usefixtures("native")
def test_request_count_says_how_each_call_ended(tmp_path):
  """As TF Serving: a call whose deadline passes counts as DEADLINE_EXCEEDED (not OK from a run
  that went on, nor CANCELLED), a call its client cancels as CANCELLED, each once. The batches
  wait an hour unless full, so the one-row calls never run."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.batching_server(tmp_path, "max_batch_size { value: 64 } batch_timeout_micros { value: 3600000000 }")
  try:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0], dtype=tf.float32))
    for _ in range(3):
      code, _ = lib.grpc_code(server.predict.Predict, request, timeout=0.5)
      assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    lib.wait_for(lambda: _request_counts(server, "m") == {"DEADLINE_EXCEEDED": 3})
    call = server.predict.Predict.future(request, timeout=600)
    threading.Event().wait(2)  # Generous: the call reaches its batch queue first.
    call.cancel()
    lib.wait_for(lambda: _request_counts(server, "m") == {"DEADLINE_EXCEEDED": 3, "CANCELLED": 1})
  finally:
    server.stop()
