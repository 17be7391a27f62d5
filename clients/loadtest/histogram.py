"""Latency histogram: HdrHistogram (the `hdrhistogram` package) at microsecond resolution.

An HDR histogram keeps every value to 3 significant digits over the whole range (1 us to 1 h) in a
fixed, small amount of memory, so percentiles up to p99.9 stay exact to 0.1% however long the run.
"""

from __future__ import annotations

from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

_LOWEST_US = 1
_HIGHEST_US = 3_600_000_000  # One hour.
_SIGNIFICANT_DIGITS = 3
REPORTED_PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile_key(percentile: float) -> str:
  """`p50`, `p99`, `p999` (p99.9): the report's name for a percentile."""
  return "p" + f"{percentile:g}".replace(".", "")


class LatencyHistogram:
  """Latencies in seconds, stored in an HdrHistogram of microseconds."""

  def __init__(self):
    self._hdr = HdrHistogram(_LOWEST_US, _HIGHEST_US, _SIGNIFICANT_DIGITS)

  @classmethod
  def of(cls, seconds: Iterable[float]) -> LatencyHistogram:
    """A histogram of these latencies, in seconds."""
    hist = cls()
    for value in seconds:
      hist.record(float(value))
    return hist

  def record(self, seconds: float) -> None:
    """Records one latency; values outside [1 us, 1 h] are clamped into range."""
    self._hdr.record_value(min(max(int(round(seconds * 1e6)), _LOWEST_US), _HIGHEST_US))

  def merge(self, other: LatencyHistogram) -> None:
    self._hdr.add(other._hdr)  # pylint: disable=protected-access

  @property
  def count(self) -> int:
    return self._hdr.get_total_count()

  def percentile(self, percentile: float) -> float:
    """The latency in seconds at `percentile` (0-100); 0 when empty."""
    return self._hdr.get_value_at_percentile(percentile) / 1e6 if self.count else 0.0

  def summary_ms(self) -> dict[str, float]:
    """count, min, mean, the reported percentiles and max, in milliseconds."""
    if not self.count:
      return {"count": 0}
    out = {"count": self.count, "min": self._hdr.get_min_value() / 1e3, "mean": self._hdr.get_mean_value() / 1e3}
    for p in REPORTED_PERCENTILES:
      out[percentile_key(p)] = self.percentile(p) * 1e3
    out["max"] = self._hdr.get_max_value() / 1e3
    return {name: (value if name == "count" else round(value, 3)) for name, value in out.items()}
