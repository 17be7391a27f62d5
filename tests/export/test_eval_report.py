"""fgr-eval's report is standard JSON, and a run or version it cannot judge is named in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from export import report_file, served_evaluation, version_report
from models import config as config_lib
from models import evaluation
from tests import cli_testlib


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


def test_an_empty_test_split_is_named_not_a_numpy_error():
  """It ended fgr-eval with numpy's 'need at least one array to concatenate'."""
  with pytest.raises(ValueError, match="^the test split holds no examples to evaluate$"):
    evaluation.rank_examples(lambda batch: None, lambda ad_id: 0, iter([]), k=10)

  class Logs:
    events_summary = "logs/events.jsonl holds 4 events, 4 of them before the test split"

  assert str(evaluation.no_test_examples(Logs())) == (
    "the test split holds no examples to evaluate: logs/events.jsonl holds 4 events, 4 of them before the test split"
  )


def test_a_damaged_version_is_named_in_one_line(tmp_path):
  """A truncated saved_model.pb ended fgr-eval in TensorFlow's OSError traceback; a version without its
  variables, in advice about devices."""
  version = tmp_path / "1"
  version.mkdir()
  (version / "saved_model.pb").write_bytes(b"\x0a\xff\xff")
  with pytest.raises(ValueError, match=r"1 does not load as a SavedModel, damaged or incomplete: ") as info:
    served_evaluation._load(str(version))
  assert "\n" not in str(info.value)


@pytest.mark.parametrize(
  "text, problem",
  [
    ('{"version": 2, "path": "x", "ind', "is not JSON"),
    ("{}", "is not a version report"),
    ("[1]", "is not a version report"),
  ],
)
def test_a_damaged_report_is_named(tmp_path, text, problem):
  """A truncated report ended fgr-eval with json's "Unterminated string starting at: line 1 column 29",
  naming no file; one without the version's number and path, with a TypeError traceback."""
  os.makedirs(tmp_path / "2" / "assets.extra")
  with open(tmp_path / "2" / version_report.REPORT_PATH, "w") as f:
    f.write(text)
  with pytest.raises(ValueError, match=rf"^\S+/2/assets.extra/export_report.json {problem}"):
    version_report.read(str(tmp_path / "2"))


def test_a_missing_version_is_said_to_be_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"^\S+/models/7 does not exist$"):
    version_report.read(str(tmp_path / "models" / "7"))


def _fgr_eval(*flags: str) -> subprocess.CompletedProcess:
  return cli_testlib.run_console_script(["fgr-eval", *flags])


def test_a_negative_max_examples_is_a_usage_error(tmp_path):
  """-1 judged every example with --output_dir, and none with --model_path ("no test examples")."""
  result = _fgr_eval(f"--model_path={tmp_path}", "--max_examples=-1")
  assert result.returncode == 1
  assert "fgr-eval: error: --max_examples must be 0 (all) or more, got -1" in result.stderr, result.stderr[-2000:]


def test_a_channels_run_is_told_apart_from_a_directory_fgr_train_did_not_write(tmp_path):
  """Its directory has no config.json at its top: fgr-eval asked whether it was an fgr-train run at all."""
  with open(tmp_path / "channels.json", "w") as f:
    json.dump({"channels": ["semantic", "efficiency"]}, f)
  with pytest.raises(FileNotFoundError) as info:
    config_lib.read_run_config(str(tmp_path))
  assert str(info.value).startswith(f"{tmp_path} is a `fgr-train --channels` run: each channel's run has a directory")
  assert str(tmp_path / "semantic") in str(info.value) and "--model_path" in str(info.value)


def test_a_version_with_truncated_variables_is_named_in_one_line(tmp_path):
  """TF's reader raised IndexError ("Read less bytes than requested"), which fgr-eval let through."""
  module = tf.Module()
  module.v = tf.Variable(tf.range(4096, dtype=tf.float32))
  module.f = tf.function(lambda: {"y": module.v * 2.0}, input_signature=[])
  tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.f})
  data = next((tmp_path / "1" / "variables").glob("variables.data-*"))
  data.write_bytes(data.read_bytes()[:100])
  with pytest.raises(ValueError, match=r"1 does not load as a SavedModel, damaged or incomplete: ") as info:
    served_evaluation._load(str(tmp_path / "1"))
  assert "\n" not in str(info.value)
