"""Server metrics, named after TF Serving's (`:tensorflow:serving:...`)."""

from collections.abc import Callable

import prometheus_client

# Latency buckets in microseconds, as TF Serving records request latency.
_LATENCY_BUCKETS_US = tuple(10 * 1.8**i for i in range(33))
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
  """Request, latency and batching metrics in a private registry.

  Args:
    registry: Where to register; a fresh one by default, so several servers
      (e.g. in tests) can live in one process.
  """

  def __init__(self, registry: prometheus_client.CollectorRegistry = None):
    self.registry = registry or prometheus_client.CollectorRegistry()
    self.request_count = prometheus_client.Counter(
      ":tensorflow:serving:request_count",
      "The total number of requests.",
      ["model_name", "status"],
      registry=self.registry,
    )
    self.request_latency = prometheus_client.Histogram(
      ":tensorflow:serving:request_latency",
      "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
      ["model_name", "API", "entrypoint"],
      buckets=_LATENCY_BUCKETS_US,
      registry=self.registry,
    )
    self.batch_size = self._batching_histogram(
      "processed_batch_size", "Tracks the batch size distribution on processing."
    )
    self.padding_size = self._batching_histogram("padding_size", "Tracks the padding size distribution on batches.")

  def _batching_histogram(self, name: str, documentation: str) -> prometheus_client.Histogram:
    """A per-model histogram of batch rows, under TF Serving's batching-session name."""
    return prometheus_client.Histogram(
      f":tensorflow:serving:batching_session:{name}",
      documentation,
      ["model_name"],
      buckets=_BATCH_BUCKETS,
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

  def exposition(self) -> bytes:
    """The metrics in Prometheus text format."""
    return prometheus_client.generate_latest(self.registry)


CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
