"""Server metrics, named after TF Serving's (`:tensorflow:serving:...`)."""

from collections.abc import Callable, Iterable
from typing import Any

import prometheus_client
from prometheus_client import metrics_core, utils

# Latency buckets in microseconds, as TF Serving records request latency.
LATENCY_BUCKETS_US = tuple(10 * 1.8**i for i in range(33))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

_REQUEST_COUNT = ":tensorflow:serving:request_count"
_REQUEST_LATENCY = ":tensorflow:serving:request_latency"
_BATCH_SIZE = ":tensorflow:serving:batching_session:processed_batch_size"
_PADDING_SIZE = ":tensorflow:serving:batching_session:padding_size"
# The model_name label of requests naming no configured model. TF Serving labels them with the name
# the client sent, so every new name adds series for good: a client cycling through names would grow
# the server without bound. "" names no model (a ModelSpec must have a name).
UNKNOWN_MODEL = ""


class Metrics:
  """Request, latency and batching metrics in a private registry.

  Args:
    registry: Where to register; a fresh one by default, so several servers
      (e.g. in tests) can live in one process.
  """

  def __init__(self, registry: prometheus_client.CollectorRegistry = None):
    self.registry = registry or prometheus_client.CollectorRegistry()
    self.request_count = prometheus_client.Counter(
      _REQUEST_COUNT,
      "The total number of requests.",
      ["model_name", "status"],
      registry=self.registry,
    )
    self.request_latency = prometheus_client.Histogram(
      _REQUEST_LATENCY,
      "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
      ["model_name", "API", "entrypoint"],
      buckets=LATENCY_BUCKETS_US,
      registry=self.registry,
    )
    self.batch_size = self._batching_histogram(_BATCH_SIZE, "Tracks the batch size distribution on processing.")
    self.padding_size = self._batching_histogram(_PADDING_SIZE, "Tracks the padding size distribution on batches.")

  def _batching_histogram(self, name: str, documentation: str) -> prometheus_client.Histogram:
    """A per-model histogram of batch rows, under TF Serving's batching-session name."""
    return prometheus_client.Histogram(
      name,
      documentation,
      ["model_name"],
      buckets=BATCH_BUCKETS,
      registry=self.registry,
    )

  def record_request(self, model: str, api: str, entrypoint: str, status: str, latency_seconds: float) -> None:
    """Counts one request and records its latency."""
    self.request_count.labels(model, status).inc()
    self.request_latency.labels(model, api, entrypoint).observe(latency_seconds * 1e6)

  def batch_observer(self, model: str) -> Callable[[int, int], None]:
    """Returns a callback recording (batch rows, padding rows) for `model`."""
    batch = self.batch_size.labels(model)
    padding = self.padding_size.labels(model)

    def observe(rows: int, padded: int) -> None:
      batch.observe(rows)
      padding.observe(padded)

    return observe

  def attach_native(self, native: Any) -> None:
    """Adds the native data plane's counts to the same four families.

    The native front end counts the requests it answers, and its batch
    queues the batches they ran in, in C++ (`_fgr_native.Metrics`, built
    with LATENCY_BUCKETS_US and BATCH_BUCKETS). From now on each family is
    exposed once, summing both sides at scrape time; requests answered in
    Python keep recording here as before.

    Args:
      native: An object whose `snapshot()` returns the native counts
        (`_fgr_native.Metrics.snapshot`).
    """
    python = (self.request_count, self.request_latency, self.batch_size, self.padding_size)
    for metric in python:
      self.registry.unregister(metric)
    self.registry.register(_MergedCollector(python, native))

  def exposition(self) -> bytes:
    """The metrics in Prometheus text format."""
    return prometheus_client.generate_latest(self.registry)


CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# (sample name, sorted label items) -> value
_Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _add(samples: _Samples, name: str, labels: dict[str, str], value: float) -> None:
  key = (name, tuple(sorted(labels.items())))
  samples[key] = samples.get(key, 0.0) + value


def _add_histogram(
  samples: _Samples,
  family: str,
  labels: dict[str, str],
  bounds: Iterable[float],
  counts: Iterable[int],
  total: float,
) -> None:
  """Adds one histogram's samples from per-bucket (not cumulative) counts,
  the last one for +Inf, as prometheus_client names them."""
  cumulative = 0
  les = [utils.floatToGoString(b) for b in bounds] + ["+Inf"]
  for le, count in zip(les, counts):
    cumulative += count
    _add(samples, f"{family}_bucket", {**labels, "le": le}, cumulative)
  _add(samples, f"{family}_count", labels, cumulative)
  _add(samples, f"{family}_sum", labels, total)


def native_samples(snapshot: dict) -> _Samples:
  """The native counts (`_fgr_native.Metrics.snapshot()`) as samples of
  the Python families: request count, latency, batch and padding sizes."""
  samples: _Samples = {}
  for model, api, entrypoint, status, count, latency_sum_us, buckets in snapshot.get("requests", ()):
    _add(samples, f"{_REQUEST_COUNT}_total", {"model_name": model, "status": status}, count)
    labels = {"model_name": model, "API": api, "entrypoint": entrypoint}
    _add_histogram(samples, _REQUEST_LATENCY, labels, LATENCY_BUCKETS_US, buckets, latency_sum_us)
  for model, count, rows_sum, rows_buckets, padding_sum, padding_buckets in snapshot.get("batches", ()):
    del count  # Each histogram's buckets add up to it.
    labels = {"model_name": model}
    _add_histogram(samples, _BATCH_SIZE, labels, BATCH_BUCKETS, rows_buckets, rows_sum)
    _add_histogram(samples, _PADDING_SIZE, labels, BATCH_BUCKETS, padding_buckets, padding_sum)
  return samples


class _MergedCollector:
  """Exposes Python metrics with the native counts added to their samples.

  Series both sides have are summed; series only one side has are exposed
  as they are. `_created` samples stay Python's.
  """

  def __init__(self, metrics, native: Any):
    self._metrics = metrics
    self._native = native

  def describe(self) -> list[metrics_core.Metric]:
    families = [family for metric in self._metrics for family in metric.describe()]
    return [metrics_core.Metric(f.name, f.documentation, f.type, f.unit) for f in families]

  def collect(self) -> list[metrics_core.Metric]:
    extra = native_samples(self._native.snapshot())
    merged = []
    for metric in self._metrics:
      for family in metric.collect():
        out = metrics_core.Metric(family.name, family.documentation, family.type, family.unit)
        mine = {family.name + suffix for suffix in ("_total", "_bucket", "_count", "_sum")}
        for sample in family.samples:
          key = (sample.name, tuple(sorted(sample.labels.items())))
          value = sample.value + extra.pop(key, 0.0)
          out.add_sample(sample.name, sample.labels, value, sample.timestamp, sample.exemplar)
        for key in [k for k in extra if k[0] in mine]:
          out.add_sample(key[0], dict(key[1]), extra.pop(key))
        merged.append(out)
    return merged
