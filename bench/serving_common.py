"""Shared pieces of the serving benchmarks: flags, measured load points with their CPU use, tables.

Servers run in their own processes (`bench.fixtures.servers`), so the load generator (fgr-loadtest's
driver, the same client for every variant) never shares a GIL with what it measures.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from bench.fixtures import resources
from bench.fixtures import servers as bench_servers
from clients.loadtest import driver, histogram, request_source


def define_flags(
  warmup_seconds: float, seconds: float, rounds: int | None, num_queries: int = 500, base_path: bool = True
) -> None:
  """Defines the flags every serving benchmark shares, with its own defaults.

  Args:
    warmup_seconds: default unmeasured lead-in per round.
    seconds: default measured seconds per round.
    rounds: default rounds per comparison; None defines no --rounds flag.
    num_queries: default number of distinct held-out queries.
    base_path: define a required --base_path (the served model).
  """
  flags.DEFINE_string(
    "run_dir", None, "fgr-train --output_dir (synthetic data) whose held-out queries to send.", required=True
  )
  if base_path:
    flags.DEFINE_string("base_path", None, "fgr-export --model_base_path of the served model.", required=True)
  flags.DEFINE_float("warmup_seconds", warmup_seconds, "Unmeasured lead-in per round.")
  flags.DEFINE_float("seconds", seconds, "Measured seconds per round.")
  if rounds is not None:
    flags.DEFINE_integer("rounds", rounds, "Rounds per comparison, alternating the variants' order (pooled).")
  flags.DEFINE_integer("num_queries", num_queries, "Distinct held-out queries to cycle through.")
  flags.DEFINE_string("output_dir", "/tmp/fgr_serving_bench", "Where the JSON results and server logs go.")


# The batching the serving benchmarks measure: one batch thread, as serving/README advises on few cores.
def batching_parameters(
  max_batch_size: int = 32, batch_timeout_micros: int = 1000, num_batch_threads: int = 1, max_enqueued_batches: int = 64
) -> str:
  """Text BatchingParameters (what --batching_parameters_file holds) with these values."""
  return (
    f"max_batch_size {{ value: {max_batch_size} }} batch_timeout_micros {{ value: {batch_timeout_micros} }} "
    f"num_batch_threads {{ value: {num_batch_threads} }} max_enqueued_batches {{ value: {max_enqueued_batches} }}"
  )


BATCHING_PARAMETERS = batching_parameters()


def define_batching_flag(help_text: str, **values: int) -> None:
  """Defines --batching_parameters: text BatchingParameters, BATCHING_PARAMETERS but for `values`."""
  flags.DEFINE_string("batching_parameters", batching_parameters(**values), help_text)


def _load(**spec) -> driver.LoadSpec:
  """A load of --warmup_seconds, then --seconds measured."""
  return driver.LoadSpec(
    warmup_seconds=flags.FLAGS.warmup_seconds, duration_seconds=flags.FLAGS.seconds, progress=False, **spec
  )


def open_loop(qps: float) -> driver.LoadSpec:
  """An open-loop load at `qps` of --warmup_seconds then --seconds measured."""
  return _load(mode="open", qps=qps)


def closed_loop(streams: int) -> driver.LoadSpec:
  """A closed-loop load of `streams` streams, --warmup_seconds then --seconds measured."""
  return _load(mode="closed", concurrency=streams)


def workdir(output_dir: str, name: str) -> str:
  """output_dir/name, created: server logs and port files of one benchmark (kept for inspection)."""
  path = os.path.join(output_dir, name)
  os.makedirs(path, exist_ok=True)
  return path


def latest_version(base_path: str) -> str:
  """The newest integer version directory under base_path."""
  versions = [int(v) for v in os.listdir(base_path) if v.isdigit()]
  if not versions:
    raise FileNotFoundError(f"no versions under {base_path}")
  return os.path.join(base_path, str(max(versions)))


def query_requests(run_dir: str, count: int, model_name: str, signature_name: str = "serving_default") -> list:
  """`count` held-out queries of a training run as PredictRequests for model_name/signature_name."""
  return request_source.with_model_spec(
    request_source.synthetic_requests(count, run_dir), model_name, signature_name, None
  )


@dataclasses.dataclass
class Variant:
  """One way of serving the same requests: a label, a target factory and its requests.

  `servers` are the processes that answer this variant; their CPU time is charged to it.
  """

  label: str
  make_target: Callable[[], driver.Target]
  requests: Sequence[Any]
  servers: Sequence[bench_servers.ServerProcess] = ()


@dataclasses.dataclass
class CpuUse:
  """CPU seconds (user + system, all threads) spent during one run, and the wall time it took.

  `server` is None for a variant with no server process (an in-process call).
  """

  server: float | None
  client: float
  wall: float


def _run_charged(variant: Variant, spec: driver.LoadSpec) -> tuple[driver.LoadResult, CpuUse]:
  """One driver run of the variant, with the CPU its servers and this client process spent on it."""
  pids = [s.process.pid for s in variant.servers]
  before = [resources.cpu_seconds(pid) for pid in pids], resources.cpu_seconds(), time.monotonic()
  result = driver.run(variant.make_target(), variant.requests, spec)
  after = [resources.cpu_seconds(pid) for pid in pids], resources.cpu_seconds(), time.monotonic()
  return result, CpuUse(
    server=sum(after[0]) - sum(before[0]) if pids else None, client=after[1] - before[1], wall=after[2] - before[2]
  )


def _per_request_ms(seconds: float | None, requests: int) -> float | None:
  return None if seconds is None else round(1e3 * seconds / max(requests, 1), 3)


def _cpu_summary(results: Sequence[driver.LoadResult], cpu: Sequence[CpuUse]) -> dict[str, float]:
  """CPU milliseconds per completed request (warm-up included, as the CPU is), and cores busy."""
  completed = sum(len(r.ok) for r in results)
  wall = sum(c.wall for c in cpu)
  server = None if cpu[0].server is None else sum(c.server for c in cpu)
  client = sum(c.client for c in cpu)
  return {
    "server_cpu_ms_per_request": _per_request_ms(server, completed),
    "client_cpu_ms_per_request": _per_request_ms(client, completed),
    "server_cores": None if server is None else round(server / wall, 2),
    "client_cores": round(client / wall, 2),
  }


def _point(
  label: str, spec: driver.LoadSpec, results: Sequence[driver.LoadResult], cpu: Sequence[CpuUse] = ()
) -> dict[str, Any]:
  """Pools several runs of one variant: merged histograms, summed counts, measured time and CPU use."""
  latency, service = histogram.LatencyHistogram(), histogram.LatencyHistogram()
  errors: collections.Counter = collections.Counter()
  for result in results:
    latency.merge(result.latency)
    service.merge(result.service)
    errors.update(result.errors)
  ok = sum(r.successes for r in results)
  lat = latency.summary_ms()
  rounds = f"{len(results)} x " if len(results) > 1 else ""
  return {
    "variant": label,
    "load": f"{spec.describe().rsplit(' + ', 1)[0]} + {rounds}{spec.duration_seconds:g} s",
    "throughput_qps": round(ok / sum(r.measured_seconds for r in results), 1),
    "p50_ms": lat.get("p50"),
    "p90_ms": lat.get("p90"),
    "p99_ms": lat.get("p99"),
    "p999_ms": lat.get("p999"),
    "service_p50_ms": service.summary_ms().get("p50"),
    "ok": ok,
    "errors": dict(errors),
    **(_cpu_summary(results, cpu) if cpu else {}),
  }


def compare(variants: Sequence[Variant], spec: driver.LoadSpec, rounds: int = 1) -> list[dict[str, Any]]:
  """Runs every variant `rounds` times, alternating the order (ABBA...) so that the shared machine's
  background load falls on all of them alike; returns one pooled point per variant, and logs lines.

  Each point also gives the CPU time per request of the variant's servers and of this client process
  (which hosts the load generator, and the model itself for in-process variants).
  """
  results: dict[str, list[driver.LoadResult]] = {v.label: [] for v in variants}
  cpu: dict[str, list[CpuUse]] = {v.label: [] for v in variants}
  for r in range(rounds):
    for variant in variants if r % 2 == 0 else variants[::-1]:
      result, used = _run_charged(variant, spec)
      results[variant.label].append(result)
      cpu[variant.label].append(used)
      print(
        f"  round {r + 1}: {variant.label:<36s} {result.throughput:>8,.1f} req/s  "
        f"p50 {result.percentile_ms(50):.3f} ms  p99 {result.percentile_ms(99):.3f} ms  "
        f"cpu/request: server {_per_request_ms(used.server, len(result.ok)) or '–'} ms, "
        f"client {_per_request_ms(used.client, len(result.ok))} ms  "
        f"errors {result.errors or 'none'}",
        flush=True,
      )
  return [_point(v.label, spec, results[v.label], cpu[v.label]) for v in variants]


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
  """A Markdown table of rows[key] under the given (key, heading) columns."""
  lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append(
      "| "
      + " | ".join(
        "–" if row.get(k) is None else (f"{row[k]:,.2f}" if isinstance(row[k], float) else str(row[k]))
        for k, _ in columns
      )
      + " |"
    )
  return "\n".join(lines)


POINT_COLUMNS = (
  ("variant", "variant"),
  ("load", "load"),
  ("throughput_qps", "req/s"),
  ("p50_ms", "p50 ms"),
  ("p90_ms", "p90 ms"),
  ("p99_ms", "p99 ms"),
  ("p999_ms", "p99.9 ms"),
  ("server_cpu_ms_per_request", "server CPU ms/req"),
  ("client_cpu_ms_per_request", "client CPU ms/req"),
  ("errors", "errors"),
)


def finish(output_dir: str, name: str, data: dict[str, Any], points: Sequence[dict[str, Any]], ratios: Any) -> None:
  """Saves the results, then prints the points' table, the ratios and where the JSON went."""
  path = save(output_dir, name, data)
  if points:
    print(table(points, POINT_COLUMNS))
  print(json.dumps(ratios))
  print(f"wrote {path}")


def save(output_dir: str, name: str, data: dict[str, Any]) -> str:
  """Writes data (plus the date and command) to output_dir/name.json; returns the path."""
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, f"{name}.json")
  data = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
    "command": " ".join(["python -m", sys.modules["__main__"].__spec__.name, *sys.argv[1:]]),
    "cpus": os.cpu_count(),
    **data,
  }
  with open(path, "w") as f:
    json.dump(data, f, indent=2)
  return path
