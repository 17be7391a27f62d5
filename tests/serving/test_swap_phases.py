"""bench/swap_phases.py: answers of a swap window placed against fgr-serve's load log."""

import time

import numpy as np

from bench import swap_phases

_YEAR = 2026


def _epoch(hour: int, minute: int, second: float) -> float:
  return time.mktime((_YEAR, 12, 2, hour, minute, 0, 0, 0, -1)) + second


def _write_log(tmp_path, version: int) -> str:
  """The log lines fgr-serve writes while loading `version` at 01:40:00-01:40:03."""
  path = tmp_path / "server.log"
  path.write_text(
    "\n".join(
      [
        "I1202 01:39:59.000000 140 model_manager.py:146] Successfully loaded servable version model: ads,"
        f" version: {version - 1}",
        f"I1202 01:40:00.000000 141 model_manager.py:98] Loading servable model: ads, version: {version}",
        "2026-12-02 01:40:00.100000: I tensorflow/core/something.cc:1] not an absl line",
        "I1202 01:40:00.500000 142 saved_model_bundle.py:227] Restored the variables in 1 microseconds and"
        f" initialized in 1 microseconds at path: /m/ads/{version}",
        f"I1202 01:40:02.000000 142 warmup.py:63] Finished reading warmup data for model at /m/ads/{version}."
        " Number of warmup records read: 20. Elapsed time (microseconds): 1500000.",
        f"I1202 01:40:02.010000 142 saved_model_bundle.py:210] Unloaded servable model: ads, version: {version - 1}",
        f"I1202 01:40:02.020000 142 model_manager.py:146] Successfully loaded servable version model: ads,"
        f" version: {version}",
      ]
    )
    + "\n"
  )
  return str(path)


def test_read_log_takes_absl_info_lines_in_local_time(tmp_path):
  lines = swap_phases.read_log(_write_log(tmp_path, 2), _YEAR)
  assert len(lines) == 6
  assert lines[1] == (_epoch(1, 40, 0.0), "Loading servable model: ads, version: 2")


def test_phase_bounds_follow_the_versions_log_lines(tmp_path):
  lines = swap_phases.read_log(_write_log(tmp_path, 2), _YEAR)
  published = _epoch(1, 39, 59.5)
  bounds = swap_phases.phase_bounds(lines, 2, published, _epoch(1, 40, 5.0))
  assert [name for name, _, _ in bounds] == list(swap_phases.PHASES)
  starts = [round(start - published, 3) for _, start, _ in bounds]
  assert starts == [0.0, 0.5, 1.0, 2.5, 2.52, 2.62]
  assert round(bounds[-1][2] - published, 3) == 5.5


def test_phase_bounds_are_empty_for_a_version_that_never_loaded(tmp_path):
  lines = swap_phases.read_log(_write_log(tmp_path, 2), _YEAR)
  assert swap_phases.phase_bounds(lines, 3, _epoch(1, 39, 59.5), _epoch(1, 40, 5.0)) == []


def test_by_phase_counts_answers_and_slow_ones_per_phase(tmp_path):
  log = _write_log(tmp_path, 2)
  published = _epoch(1, 39, 59.5)
  scheduled = published + np.arange(0, 5.5, 0.005)  # 200 QPS over the whole window.
  latency = np.full(len(scheduled), 0.004)
  restoring = (scheduled >= _epoch(1, 40, 0.0)) & (scheduled < _epoch(1, 40, 0.5))
  latency[np.flatnonzero(restoring)[:3]] = 0.030
  latency[-1] = np.nan  # A failed request counts nowhere.
  report = swap_phases.by_phase(scheduled, latency, [(2, published, _epoch(1, 40, 5.0))], log, slow_ms=10)
  assert report["restore"]["answers"] == 100
  assert report["restore"]["slow_answers"] == 3
  assert report["restore"]["seconds"] == 0.5
  assert report["poll"]["slow_answers"] == 0
  assert sum(p["answers"] for p in report.values()) == len(scheduled) - 1


def test_load_seconds_runs_from_the_versions_loading_line_to_its_loaded_line(tmp_path):
  lines = swap_phases.read_log(_write_log(tmp_path, 2), _YEAR)
  assert swap_phases.load_seconds(lines, 2) == 2.02
  assert swap_phases.load_seconds(lines, 1) is None  # Its "Loading servable" line is not in the log.
  assert swap_phases.load_seconds(lines, 12) is None
