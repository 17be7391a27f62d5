"""The load test's outputs: a printed summary, a JSON report and a PNG of latency over time."""

from __future__ import annotations

import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from clients.loadtest import (
  driver,  # pylint: disable=g-import-not-at-top,wrong-import-position
  histogram,  # pylint: disable=g-import-not-at-top,wrong-import-position
)


def timeline(result: driver.LoadResult, bucket_seconds: float = 1.0) -> list[dict[str, float]]:
  """Per-bucket (by intended send time) request counts, errors and latency p50/p99/max in ms."""
  if not len(result.intended):
    return []
  buckets = np.floor(result.intended / bucket_seconds).astype(int)
  rows = []
  for b in np.unique(buckets):
    mask = buckets == b
    good = histogram.LatencyHistogram.of(result.latencies[mask & result.ok]).summary_ms()
    rows.append(
      {
        "t": round(float(b * bucket_seconds), 3),
        "requests": int(mask.sum()),
        "errors": int((mask & ~result.ok).sum()),
        **({"p50_ms": good["p50"], "p99_ms": good["p99"], "max_ms": good["max"]} if good["count"] else {}),
      }
    )
  return rows


def to_dict(result: driver.LoadResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """The JSON report."""
  spec = result.spec
  return {
    "target": result.target,
    "started_at": result.started_at,
    "mode": spec.mode,
    "offered_qps": spec.qps if spec.mode == "open" else None,
    "concurrency": spec.concurrency if spec.mode == "closed" else None,
    "warmup_seconds": spec.warmup_seconds,
    "duration_seconds": spec.duration_seconds,
    "measured_seconds": round(result.measured_seconds, 3),
    "requests": {
      "sent": result.sent,
      "completed_in_window": result.completed,
      "ok": result.successes,
      "cancelled_at_drain": result.cancelled,
    },
    "throughput_qps": round(result.throughput, 2),
    "latency_ms": result.latency.summary_ms(),
    "service_latency_ms": result.service.summary_ms(),
    "send_lag_ms": result.send_lag.summary_ms(),
    "errors": result.errors,
    "coordinated_omission_corrected": True,
    "histogram": "HdrHistogram, 1 us to 1 h, 3 significant digits",
    "timeline": timeline(result),
    **(extra or {}),
  }


def summary(result: driver.LoadResult) -> str:
  """A few human-readable lines."""
  lat = result.latency.summary_ms()
  pcts = "  ".join(
    f"{histogram.percentile_key(p)} {lat.get(histogram.percentile_key(p), 0):.3f}"
    for p in histogram.REPORTED_PERCENTILES
  )
  lines = [
    f"{result.target}: {result.spec.describe()}",
    f"  throughput {result.throughput:,.1f} req/s ({result.successes} ok of {result.completed} in the window, "
    f"{result.sent} sent in all)",
    f"  latency ms (from intended send time)  {pcts}  max {lat.get('max', 0):.3f}",
  ]
  if result.spec.mode == "open":
    service = result.service.summary_ms()
    lines.append(
      f"  service time ms (from actual send)    p50 {service.get('p50', 0):.3f}  p99 {service.get('p99', 0):.3f}"
      f"; sender lag p99 {result.send_lag.summary_ms().get('p99', 0):.3f} ms"
    )
  lines.append("  errors: " + (", ".join(f"{code} {n}" for code, n in result.errors.items()) or "none"))
  return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
    f.write("\n")


def plot(result: driver.LoadResult, path: str, title: str = "") -> None:
  """Latency of every request against its intended send time, with per-second p50/p99 and errors."""
  fig, ax = plt.subplots(figsize=(10, 5))
  ok = result.ok
  if len(result.intended):
    ax.scatter(result.intended[ok], result.latencies[ok] * 1e3, s=2, alpha=0.3, color="tab:blue", label="request")
    if (~ok).any():
      ax.scatter(result.intended[~ok], result.latencies[~ok] * 1e3, s=12, marker="x", color="tab:red", label="error")
    rows = [r for r in timeline(result) if "p50_ms" in r]
    ts = [r["t"] + 0.5 for r in rows]
    ax.plot(ts, [r["p50_ms"] for r in rows], color="tab:green", label="p50 per second")
    ax.plot(ts, [r["p99_ms"] for r in rows], color="tab:orange", label="p99 per second")
  if result.spec.warmup_seconds:
    ax.axvspan(0, result.spec.warmup_seconds, color="grey", alpha=0.15, label="warm-up (not measured)")
  ax.set_yscale("log")
  ax.set_xlabel("intended send time (s)")
  ax.set_ylabel("latency from intended send (ms)")
  ax.set_title(title or f"{result.target}: {result.spec.describe()}", fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, loc="upper right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
