"""fgr-export's flags: a flag this kind of export would ignore, or a value no request could take, is refused
before anything is built."""

import json
import os
import re
import subprocess
import sys

import pytest

from models import channels as channels_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# export_cli defines its absl flags at import, and other modules (bench.channels) define some of the
# same names, so the command lines run in a subprocess of their own: one, for all of them.
_RUN_COMMAND_LINES = """
import json, sys
from absl import app
from export import export_cli
for argv in json.loads(sys.argv[1]):
  export_cli.FLAGS.unparse_flags()
  export_cli.FLAGS(["fgr-export", *argv])
  try:
    export_cli.main(["fgr-export"])
    outcome = "published"
  except app.UsageError as e:
    outcome = f"usage error: {e}"
  except ValueError as e:
    outcome = f"error: {e}"
  except Exception as e:  # Past every check: no checkpoint to restore in these runs.
    outcome = f"passed the checks ({type(e).__name__})"
  print(json.dumps(outcome))
"""


# (label, the run's kind, flags, what fgr-export says: a regular expression its answer starts with).
CASES = [
  (
    "channel_flags_single",
    "single",
    ["--diversity=dpp", "--channel_weights=semantic=2", "--min_relevance=0.5", "--channel_depth=30"],
    r"usage error: --channel_depth, --channel_weights, --min_relevance, --diversity: only for a "
    r"`fgr-train --channels` run, and .* is not one \(it has no channels\.json\)",
  ),
  ("calibration_single", "single", ["--calibration_examples=100"], r"usage error: --calibration_examples: only for"),
  # Given, even at its default value, a channel flag says the user expected a channels run.
  ("default_diversity_single", "single", ["--diversity=none"], r"usage error: --diversity: only for"),
  ("fusion_no_cooc", "single", ["--fusion_weight=0.9"], r"usage error: --fusion_weight: only with --cooccurrence"),
  (
    "cooc_neigh_no_cooc",
    "single",
    ["--nocooccurrence", "--cooccurrence_neighbours=3"],
    r"usage error: --cooccurrence_neighbours: only with --cooccurrence, which is off",
  ),
  (
    "excl_depth_no_excl",
    "single",
    ["--exclusion_depth=7"],
    r"usage error: --exclusion_depth: only with --exclude_history",
  ),
  (
    "excl_depth_channels",
    "channels",
    ["--exclude_history", "--exclusion_depth=7"],
    r"usage error: --exclusion_depth: not for a --channels run",
  ),
  ("cooc_channels", "channels", ["--cooccurrence"], r"usage error: --cooccurrence fuses with a single-tower graph"),
  (
    "k_negative",
    "single",
    ["--k=-5"],
    r"usage error: k must be at least 1 \(the candidates returned per request\), got -5",
  ),
  (
    "weight_nan",
    "channels",
    ["--channel_weights=semantic=nan"],
    r"usage error: channel weights must be finite numbers >= 0, one per channel; got \{'semantic': nan\}",
  ),
  ("weight_inf", "channels", ["--channel_weights=semantic=inf"], r"usage error: channel weights must be finite"),
  (
    "weight_syntax",
    "channels",
    ["--channel_weights=semantic"],
    r"usage error: --channel_weights must look like name=weight",
  ),
  (
    "weights_zero",
    "channels",
    ["--channel_weights=semantic=0,efficiency=0"],
    r"error: some channel weight must be > 0 .*; got \(0\.0, 0\.0\)",
  ),
  (
    "gamma_inf",
    "channels",
    ["--diversity=ssd", "--ssd_gamma=inf"],
    r"usage error: ssd gamma must be a finite number >= 0; got inf",
  ),
  (
    "min_relevance_nan",
    "channels",
    ["--min_relevance=nan"],
    r"usage error: min_relevance must be in \[0, 1\]; got nan",
  ),
  (
    "depth_below_k",
    "channels",
    ["--channel_depth=3", "--k=10"],
    r"error: k must be in \[1, 6\] \(the sum of the channels' depths \[3, 3\]\), got 10: lower k or search the "
    r"channels deeper \(fgr-export --channel_depth\)",
  ),
  # Flags that apply pass every check, and the export goes on to restore the towers.
  ("single_ok", "single", ["--exclude_history", "--exclusion_depth=7", "--k=10"], r"passed the checks"),
  ("cooc_ok", "single", ["--cooccurrence", "--fusion_weight=0.9", "--cooccurrence_neighbours=3"], r"passed the checks"),
  (
    "channels_ok",
    "channels",
    ["--diversity=ssd", "--ssd_gamma=2", "--channel_weights=semantic=0", "--min_relevance=0.5", "--k=10"],
    r"passed the checks",
  ),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  """What fgr-export says to each command line of `CASES`, by label, for a single-tower and a channels run.

  Neither run has checkpoints: an export that passes every check fails when it restores the towers.
  """
  single = tmp_path_factory.mktemp("single")
  run = tmp_path_factory.mktemp("channels")
  channels_lib.write_channels(str(run), [channels_lib.SEMANTIC, channels_lib.EFFICIENCY], {})
  base = tmp_path_factory.mktemp("models")
  argvs = []
  for _, kind, flags, _ in CASES:
    directory = run if kind == "channels" else single
    argvs.append([f"--checkpoint_dir={directory}", f"--model_base_path={base}", "--index=brute_force", *flags])
  result = subprocess.run(
    [sys.executable, "-c", _RUN_COMMAND_LINES, json.dumps(argvs)],
    capture_output=True,
    text=True,
    env=dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3"),
    timeout=300,
    cwd=REPO_ROOT,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('"')]
  assert len(lines) == len(CASES), result.stdout
  return {case[0]: line for case, line in zip(CASES, lines)}


@pytest.mark.parametrize("label, expected", [(case[0], case[3]) for case in CASES], ids=[case[0] for case in CASES])
def test_fgr_export_refuses_flags_it_would_ignore_and_values_no_request_could_take(outcomes, label, expected):
  assert re.match(expected, outcomes[label]), outcomes[label]
