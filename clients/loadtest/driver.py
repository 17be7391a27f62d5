"""The load engine: open-loop (fixed arrival rate) and closed-loop (N streams) on one asyncio loop.

Open loop: request i is due at `start + i / qps` whatever happened before. The sender never waits for
answers (calls are asyncio tasks over grpc.aio), and each latency is measured from the request's
*intended* send time, so a stalled server, or a sender that fell behind, shows up as latency instead of
silently lowering the offered load (coordinated omission). The time actually spent on the wire is kept
separately as `service` latency, to show how much an uncorrected tool would have hidden.

Closed loop: N streams each send their next request as soon as the previous answer arrives. Latency
is measured from that moment (the stream's intended send time); the figure of merit is throughput at
that concurrency.

Targets are anything with `async call(request)`; a gRPC `Predict` target is provided here, and the
benchmarks add in-process and two-call targets so the same client measures every variant.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import selectors
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
import numpy as np
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tqdm import tqdm

from clients import grpc_channel
from clients.loadtest import histogram

OK = "OK"
MODES = ("open", "closed")


class Target(Protocol):
  """Something to send requests to."""

  name: str

  async def open(self) -> None:
    """Connects; called inside the event loop before the first call."""

  async def call(self, request: Any) -> Any:
    """Sends one request and returns its answer; raises on failure."""

  async def close(self) -> None:
    """Releases connections."""


class GrpcPredictTarget:
  """PredictionService.Predict over grpc.aio, round-robin over `channels` HTTP/2 connections.

  Args:
    address: host:port.
    timeout: per-request deadline in seconds.
    channels: number of channels; one is enough for most loads, more spread the client's HTTP/2 work.
    tls: TLS to use (a server started with --ssl_config_file); None: plaintext.
  """

  def __init__(self, address: str, timeout: float = 10.0, channels: int = 1, tls: grpc_channel.Tls | None = None):
    if channels < 1:
      raise ValueError(f"channels must be >= 1, got {channels}")
    if timeout <= 0:
      raise ValueError(f"timeout must be > 0 seconds, got {timeout:g}")
    self.name = f"grpc://{address}"
    self._address, self._timeout, self._num_channels, self._tls = address, timeout, channels, tls
    self._channels: list[grpc.aio.Channel] = []
    self._stubs: list[prediction_service_pb2_grpc.PredictionServiceStub] = []
    self._next = 0

  async def open(self) -> None:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    # Distinct channel arguments give each channel its own connection instead of a shared subchannel.
    self._channels = [
      grpc_channel.aio_channel(self._address, self._tls, options + [("fgr.loadtest.channel", i)])
      for i in range(self._num_channels)
    ]
    self._stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in self._channels]

  async def call(self, request: Any) -> Any:
    self._next = (self._next + 1) % len(self._stubs)
    return await self._stubs[self._next].Predict(request, timeout=self._timeout)

  async def close(self) -> None:
    for channel in self._channels:
      await channel.close()


@dataclasses.dataclass
class LoadSpec:
  """How to load the target.

  Attributes:
    mode: "open" (fixed arrival rate `qps`) or "closed" (`concurrency` streams back to back).
    qps: open loop: offered requests per second.
    concurrency: closed loop: concurrent streams.
    warmup_seconds: unmeasured lead-in at the same load.
    duration_seconds: measured period.
    max_in_flight: open loop: cap on outstanding requests (the sender then waits; latency still
      counts from the intended send time, so the wait is measured, not hidden).
    max_requests: hard cap on requests sent, warm-up included (None: no cap beyond the duration).
    drain_seconds: how long to wait for outstanding answers after the last send before cancelling.
    progress: show a live progress bar on stderr.
  """

  mode: str = "open"
  qps: float = 100.0
  concurrency: int = 8
  warmup_seconds: float = 2.0
  duration_seconds: float = 10.0
  max_in_flight: int = 4096
  max_requests: int | None = None
  drain_seconds: float = 15.0
  progress: bool = True

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.mode == "open" and self.qps <= 0:
      raise ValueError("open loop needs qps > 0")
    if self.mode == "closed" and self.concurrency < 1:
      raise ValueError("closed loop needs concurrency >= 1")
    if self.duration_seconds <= 0 or self.warmup_seconds < 0:
      raise ValueError("duration must be > 0 and warm-up >= 0")
    # With no slot the open-loop sender would wait forever for one.
    if self.max_in_flight < 1:
      raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
    if self.max_requests is not None and self.max_requests < 1:
      raise ValueError(f"max_requests must be >= 1 (or None for no cap), got {self.max_requests}")
    if self.drain_seconds < 0:
      raise ValueError(f"drain_seconds must be >= 0, got {self.drain_seconds:g}")

  def describe(self) -> str:
    load = f"{self.qps:g} QPS open loop" if self.mode == "open" else f"{self.concurrency} closed-loop streams"
    return f"{load}, {self.warmup_seconds:g} s warm-up + {self.duration_seconds:g} s"


@dataclasses.dataclass
class LoadResult:
  """Everything measured in one run. Times in seconds.

  The histograms and status counts cover requests intended inside the measured window; the per-request
  arrays (`intended` relative to the run's start, `latencies` from intended send, `ok`) cover every
  completed request, warm-up included, for the timeline and the plot.
  """

  spec: LoadSpec
  target: str
  started_at: str
  latency: histogram.LatencyHistogram
  service: histogram.LatencyHistogram
  send_lag: histogram.LatencyHistogram
  statuses: collections.Counter
  sent: int
  cancelled: int
  measured_seconds: float
  intended: np.ndarray
  latencies: np.ndarray
  ok: np.ndarray

  @property
  def completed(self) -> int:
    return int(sum(self.statuses.values()))

  @property
  def successes(self) -> int:
    return int(self.statuses.get(OK, 0))

  @property
  def throughput(self) -> float:
    """Successful measured requests per second of the measured period."""
    return self.successes / self.measured_seconds if self.measured_seconds > 0 else 0.0

  @property
  def errors(self) -> dict[str, int]:
    return {code: n for code, n in sorted(self.statuses.items()) if code != OK}

  def percentile_ms(self, percentile: float) -> float:
    return self.latency.percentile(percentile) * 1e3


def _status(error: BaseException) -> str:
  """A gRPC status code name for a failed call."""
  if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
    return error.code().name
  if isinstance(error, asyncio.TimeoutError):
    return grpc.StatusCode.DEADLINE_EXCEEDED.name
  if isinstance(error, asyncio.CancelledError):
    return grpc.StatusCode.CANCELLED.name
  return f"{grpc.StatusCode.UNKNOWN.name}:{type(error).__name__}"


class _Recorder:
  """Collects completions; only requests intended inside the measured window enter the histograms."""

  def __init__(self, start: float, measure_from: float, measure_to: float):
    self.start, self.measure_from, self.measure_to = start, measure_from, measure_to
    self.latency = histogram.LatencyHistogram()
    self.service = histogram.LatencyHistogram()
    self.send_lag = histogram.LatencyHistogram()
    self.statuses: collections.Counter = collections.Counter()
    self.intended: list[float] = []
    self.latencies: list[float] = []
    self.ok: list[bool] = []
    self.last_measured_done = measure_from
    self.sent = 0
    self.in_flight = 0

  def record(self, intended: float, sent: float, done: float, status: str) -> None:
    self.intended.append(intended - self.start)
    self.latencies.append(done - intended)
    self.ok.append(status == OK)
    if self.measure_from <= intended < self.measure_to:
      self.statuses[status] += 1
      self.last_measured_done = max(self.last_measured_done, done)
      if status == OK:
        self.latency.record(done - intended)
        self.service.record(done - sent)
        self.send_lag.record(sent - intended)


async def _send(target: Target, request: Any, intended: float, recorder: _Recorder) -> None:
  sent = time.perf_counter()
  recorder.sent += 1
  recorder.in_flight += 1
  try:
    await target.call(request)
    status = OK
  except Exception as e:  # pylint: disable=broad-except  # Every failure is counted by its status.
    status = _status(e)
  finally:
    recorder.in_flight -= 1
  recorder.record(intended, sent, time.perf_counter(), status)


async def _open_loop(
  target: Target, requests: Sequence[Any], spec: LoadSpec, recorder: _Recorder, end: float
) -> set[asyncio.Task]:
  total = int((spec.warmup_seconds + spec.duration_seconds) * spec.qps)
  if spec.max_requests is not None:
    total = min(total, spec.max_requests)
  slots = asyncio.Semaphore(spec.max_in_flight)
  tasks: set[asyncio.Task] = set()

  async def one(i: int, intended: float) -> None:
    try:
      await _send(target, requests[i % len(requests)], intended, recorder)
    finally:
      slots.release()

  for i in range(total):
    intended = recorder.start + i / spec.qps
    if intended >= end:
      break
    delay = intended - time.perf_counter()
    if delay > 0:
      await asyncio.sleep(delay)
    await slots.acquire()
    task = asyncio.create_task(one(i, intended))
    tasks.add(task)
    task.add_done_callback(tasks.discard)
  return tasks


async def _closed_loop(
  target: Target, requests: Sequence[Any], spec: LoadSpec, recorder: _Recorder, end: float
) -> set[asyncio.Task]:
  cap = spec.max_requests if spec.max_requests is not None else sys.maxsize

  async def stream(offset: int) -> None:
    i = offset
    while recorder.sent < cap:
      intended = time.perf_counter()
      if intended >= end:
        return
      await _send(target, requests[i % len(requests)], intended, recorder)
      i += spec.concurrency

  return {asyncio.create_task(stream(j)) for j in range(spec.concurrency)}


async def _progress(spec: LoadSpec, recorder: _Recorder, end: float) -> None:
  """A live bar over the run's seconds, with the last half-second's rate, p50/p99 and errors."""
  total = spec.warmup_seconds + spec.duration_seconds
  bar = tqdm(
    total=round(total, 1),
    unit="s",
    file=sys.stderr,
    dynamic_ncols=True,
    leave=True,
    bar_format="{desc} |{bar}| {n:.1f}/{total:.1f}s{postfix}",
  )
  seen = 0
  last = time.perf_counter()
  try:
    while True:
      await asyncio.sleep(0.5)
      now = time.perf_counter()
      latencies = np.asarray(recorder.latencies[seen:])
      ok = np.asarray(recorder.ok[seen:], dtype=bool)
      seen += len(latencies)
      phase = "warm-up" if now < recorder.measure_from else ("measure" if now < end else "drain")
      bar.set_description_str(phase, refresh=False)  # Drawn once, by the update below.
      good = histogram.LatencyHistogram.of(latencies[ok] if len(latencies) else latencies)
      bar.set_postfix_str(
        f"{good.count / max(now - last, 1e-9):,.0f} ok/s, "
        + (f"p50 {good.percentile(50) * 1e3:.2f} ms, p99 {good.percentile(99) * 1e3:.2f} ms, " if good.count else "")
        + f"in flight {recorder.in_flight}, errors {int((~ok).sum())}",
        refresh=False,
      )
      bar.update(round(min(now, end + 0.0) - recorder.start - bar.n, 1))
      last = now
  except asyncio.CancelledError:
    bar.close()
    raise


async def run_async(target: Target, requests: Sequence[Any], spec: LoadSpec) -> LoadResult:
  """Runs one load test inside the current event loop (the target is opened and closed here)."""
  if not requests:
    raise ValueError("no requests to send")
  await target.open()
  try:
    start = time.perf_counter() + 0.05
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    measure_from = start + spec.warmup_seconds
    end = measure_from + spec.duration_seconds
    recorder = _Recorder(start, measure_from, end)
    progress = asyncio.create_task(_progress(spec, recorder, end)) if spec.progress else None
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    loop = _open_loop if spec.mode == "open" else _closed_loop
    tasks = await loop(target, requests, spec, recorder, end)
    cancelled = 0
    if tasks:
      _, pending = await asyncio.wait(tasks, timeout=max(0.0, end - time.perf_counter()) + spec.drain_seconds)
      for task in pending:
        task.cancel()
      cancelled = len(pending)
      if pending:
        await asyncio.wait(pending, timeout=5.0)
    if progress:
      progress.cancel()
      await asyncio.gather(progress, return_exceptions=True)
  finally:
    await target.close()
  intended = np.asarray(recorder.intended)
  return LoadResult(
    spec=spec,
    target=target.name,
    started_at=started_at,
    latency=recorder.latency,
    service=recorder.service,
    send_lag=recorder.send_lag,
    statuses=recorder.statuses,
    sent=recorder.sent,
    cancelled=cancelled,
    # From the start of the window to the last measured answer (at least the window).
    measured_seconds=max(recorder.last_measured_done, end) - measure_from,
    intended=intended,
    latencies=np.asarray(recorder.latencies),
    ok=np.asarray(recorder.ok, dtype=bool),
  )


def run(target: Target, requests: Sequence[Any], spec: LoadSpec) -> LoadResult:
  """Runs one load test on a fresh event loop, whose timers keep to the open loop's schedule.

  asyncio's default loop waits in epoll, whose timeout is whole milliseconds, rounded up: paced by
  `asyncio.sleep`, sends left ~1 ms late at p50 and every latency carried it. select() takes
  microseconds, and the driver watches few descriptors (below select's 1,024).
  """
  with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())) as runner:
    return runner.run(run_async(target, requests, spec))
