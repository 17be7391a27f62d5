"""fgr-eval's report is standard JSON."""

from __future__ import annotations

import json
import math

import numpy as np

from export import report_file


def _strict(text: str):
  """json.loads that refuses NaN and Infinity, as jq, JavaScript and most JSON readers do."""

  def refuse(constant: str):
    raise ValueError(f"not JSON: {constant}")

  return json.loads(text, parse_constant=refuse)


def test_a_metric_with_nothing_to_measure_is_null_not_nan():
  """A test slice without a conversion has a NaN conversion coverage; json.dumps wrote `NaN`, which
  made the whole report unreadable to anything but Python."""
  report = {
    "num_examples": 1,
    "water_level": {"click_coverage": 1.0, "conversion_coverage": float("nan"), "ratio": np.float64("inf")},
    "baselines": [{"noise_ratio": -math.inf}, 0.5],
  }
  assert _strict(report_file.to_json(report)) == {
    "num_examples": 1,
    "water_level": {"click_coverage": 1.0, "conversion_coverage": None, "ratio": None},
    "baselines": [{"noise_ratio": None}, 0.5],
  }


def test_the_report_file_holds_standard_json(tmp_path, capsys):
  path = str(tmp_path / "report.json")
  report_file.publish(report_file.to_json({"recall@10": float("nan")}), path)
  with open(path) as f:
    assert _strict(f.read()) == {"recall@10": None}
  assert _strict(capsys.readouterr().out) == {"recall@10": None}
