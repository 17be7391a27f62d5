"""Where the slow answers of a swap fall: each answer in a swap window placed against fgr-serve's log.

A swap window (bench/freshness.py) runs from the publish to 3 s after the new version's first answer.
fgr-serve logs each step of a load, so the window splits into phases:

- poll: the publish, until fgr-serve's poll finds the version ("Loading servable");
- restore: restoring the variables and running the init op ("Restored the variables");
- warm-up: replaying the warm-up requests, which builds the ScaNN searcher ("Finished reading
  warmup data");
- switch: until the version serves ("Successfully loaded");
- after switch, first 100 ms (the old version unloads in it), and after switch, rest: the new
  version answering.

Answers are placed by the time they were scheduled (the open-loop load counts latency from then).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import numpy as np

from bench.fixtures import latency

PHASES = ("poll", "restore", "warm-up", "switch", "after switch, first 100 ms", "after switch, rest")

_LINE = re.compile(r"^I(\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+)\s+\d+\s+\S+\] (.*)$")
# The log line that ends each of the first four phases, given the version number.
_PHASE_ENDS = (
  lambda v: rf"^Loading servable model: \S+, version: {v}$",
  lambda v: rf"^Restored the variables .* at path: .*/{v}$",
  lambda v: rf"^Finished reading warmup data for model at .*/{v}\.",
  lambda v: rf"^Successfully loaded servable version model: \S+, version: {v}$",
)


def read_log(log_path: str, year: int) -> list[tuple[float, str]]:
  """(epoch seconds, message) of each absl INFO line of a server log written in `year` (local time)."""
  lines = []
  with open(log_path, errors="replace") as f:
    for line in f:
      match = _LINE.match(line.rstrip("\n"))
      if match:
        month, day, hour, minute = (int(match.group(i)) for i in range(1, 5))
        minute_start = time.mktime((year, month, day, hour, minute, 0, 0, 0, -1))
        lines.append((minute_start + float(match.group(5)), match.group(6)))
  return lines


def logged_at(lines: list[tuple[float, str]], pattern: str, after: float = float("-inf")) -> list[float]:
  """When the messages matching `pattern` were logged, from `after` on."""
  regex = re.compile(pattern)
  return [t for t, message in lines if t >= after and regex.search(message)]


def load_seconds(lines: list[tuple[float, str]], version: int) -> float | None:
  """A version's load plus warm-up: its first "Loading servable" line to its last "Successfully loaded"."""
  started = logged_at(lines, _PHASE_ENDS[0](version))
  loaded = logged_at(lines, _PHASE_ENDS[-1](version))
  return round(loaded[-1] - started[0], 2) if started and loaded else None


def phase_bounds(
  lines: list[tuple[float, str]], version: int, published_at: float, window_end: float
) -> list[tuple[str, float, float]]:
  """(phase, start, end) of one swap window; a phase whose log line is missing is left out."""
  ends = []
  for pattern in _PHASE_ENDS:
    found = logged_at(lines, pattern(version), after=published_at - 1)
    ends.append(found[0] if found else None)
  if ends[-1] is None:
    return []
  bounds, start = [], published_at
  for name, end in zip(PHASES[:4], ends):
    if end is not None:
      bounds.append((name, start, max(start, end)))
      start = max(start, end)
  bounds.append((PHASES[4], start, start + 0.1))
  bounds.append((PHASES[5], start + 0.1, max(start + 0.1, window_end)))
  return bounds


def by_phase(
  scheduled: np.ndarray,
  latency_s: np.ndarray,
  windows: Sequence[tuple[int, float, float]],
  log_path: str,
  slow_ms: float,
) -> dict[str, dict[str, float | int]]:
  """Per phase over all windows: its seconds, answers, p99, and slow answers (over `slow_ms`).

  Args:
    scheduled: When each request was scheduled (epoch seconds).
    latency_s: Its latency in seconds (NaN for failed requests).
    windows: (version, published_at, window_end) of each swap.
    log_path: fgr-serve's log of the run.
    slow_ms: The latency counted as slow (e.g. twice the steady p99).
  """
  if not windows:
    return {}
  lines = read_log(log_path, time.localtime(windows[0][1]).tm_year)
  masks = {name: np.zeros(len(scheduled), bool) for name in PHASES}
  seconds = dict.fromkeys(PHASES, 0.0)
  for version, published_at, window_end in windows:
    for name, start, end in phase_bounds(lines, version, published_at, window_end):
      masks[name] |= (scheduled >= start) & (scheduled < end)
      seconds[name] += end - start
  answered = ~np.isnan(latency_s)
  report = {}
  for name in PHASES:
    values = latency_s[masks[name] & answered]
    if len(values):
      report[name] = {
        "seconds": round(seconds[name], 2),
        "answers": int(len(values)),
        **latency.percentiles(values, (99,)),
        "slow_answers": int(np.sum(values * 1e3 > slow_ms)),
      }
  return report
