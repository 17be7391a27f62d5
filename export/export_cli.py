"""fgr-export: writes a training run's towers and a nearest-neighbour index as one SavedModel version."""

from __future__ import annotations

import json
import os

from absl import app, flags

from cli import flag_use
from engine import base, channels
from export import channel_exporter, exporter, signatures, versions
from models import channels as channels_lib

FLAGS = flags.FLAGS
_DEFAULTS = exporter.ExportConfig()
_CHANNELS = channel_exporter.ChannelOptions()

flags.DEFINE_string("checkpoint_dir", None, "The --output_dir of fgr-train (config.json + checkpoints/).")
flags.DEFINE_string("model_base_path", None, "Model base path; the version is written to BASE/<version>/.")
flags.DEFINE_string("index", _DEFAULTS.index, f"Index backend, one of {base.available_backends()}.")
flags.DEFINE_integer("k", _DEFAULTS.k, "Candidates returned per request.")
flags.DEFINE_list("index_options", [], "Backend options as name=value pairs, e.g. num_leaves=1000,reorder=400.")
flags.DEFINE_integer("version", None, "Version number to write (a positive integer); defaults to one above the newest.")
flags.DEFINE_integer(
  "num_warmup_requests",
  _DEFAULTS.num_warmup_requests,
  "Warm-up requests written to assets.extra/tf_serving_warmup_requests (at most 1000).",
)
flags.DEFINE_integer("eval_queries", _DEFAULTS.eval_queries, "Held-out queries for the recall@k check.")
flags.DEFINE_enum(
  "precision",
  None,
  ["float32", "mixed_bfloat16", "mixed_float16"],
  "Compute precision of the exported towers; default: the fastest measured on this device "
  "(float32 on CPU). Outputs stay float32.",
)
flags.DEFINE_bool(
  "jit_compile",
  None,
  "XLA-compile the towers; default: the fastest measured on this device "
  "(off on CPU). Stock TF Serving then needs --xla_cpu_compilation_enabled.",
)
flags.DEFINE_integer(
  "channel_depth",
  _CHANNELS.depth,
  "With a --channels run: candidates per channel (the default and the most a request may ask; 0: 2k).",
)
flags.DEFINE_list(
  "channel_weights",
  [],
  "With a --channels run: default weights in the pooled score, e.g. semantic=1,efficiency=2 (default 1).",
)
flags.DEFINE_float(
  "min_relevance",
  _CHANNELS.min_relevance,
  "With a --channels run: default minimum relevance probability of a candidate.",
)
flags.DEFINE_enum(
  "diversity", _CHANNELS.diversity, list(channels.DIVERSITY_METHODS), "With a --channels run: default re-ranking."
)
flags.DEFINE_integer("diversity_window", _CHANNELS.window, "Default sliding window of SSD (and DPP).")
flags.DEFINE_float("ssd_gamma", _CHANNELS.gamma, "Default SSD trade-off between score and diversity.")
flags.DEFINE_float("dpp_theta", _CHANNELS.theta, "Default DPP trade-off between score and diversity, in [0, 1).")
flags.DEFINE_integer(
  "calibration_examples", _CHANNELS.calibration_examples, "Held-out examples the channel calibrations are fit on."
)
flags.DEFINE_bool(
  "exclude_history",
  _DEFAULTS.exclude_history,
  "Never return an item of the request's own hist_ids (TFRS's query_with_exclusions): for catalogs "
  "where a user does not take the same item twice.",
)
flags.DEFINE_integer(
  "exclusion_depth",
  _DEFAULTS.exclusion_depth,
  "With --exclude_history, candidates searched beyond --k to make up for excluded ones.",
)
flags.DEFINE_bool(
  "cooccurrence",
  _DEFAULTS.cooccurrence,
  "Fuse an item-to-item co-occurrence channel over hist_ids (ItemCF, fit on the training log) with the "
  "towers' search, by reciprocal rank fusion. Not for --channels runs.",
)
flags.DEFINE_integer(
  "cooccurrence_neighbours", _DEFAULTS.cooccurrence_neighbours, "With --cooccurrence, co-occurring items kept per item."
)
flags.DEFINE_float(
  "fusion_weight", _DEFAULTS.fusion_weight, "With --cooccurrence, the towers' share of the rank fusion, in [0, 1]."
)
flags.DEFINE_bool(
  "allow_signature_change",
  _DEFAULTS.allow_signature_change,
  "Publish even if the version's signatures would break the clients of the base path's newest version "
  "(an input added, removed or retyped; an output or a signature removed). Refused by default: servers "
  "move every client to the newest version.",
)
flags.mark_flags_as_required(["checkpoint_dir", "model_base_path"])


# Flags that only a `fgr-train --channels` run uses, and flags that only --cooccurrence uses. Given
# elsewhere, each would be ignored without a word, so `check_flags_apply` refuses it.
_CHANNEL_FLAGS = (
  "channel_depth",
  "channel_weights",
  "min_relevance",
  "diversity",
  "diversity_window",
  "ssd_gamma",
  "dpp_theta",
  "calibration_examples",
)
_COOCCURRENCE_FLAGS = ("cooccurrence_neighbours", "fusion_weight")


def check_flags_apply(channels_run: bool) -> None:
  """Refuses a flag the command line sets that this kind of export would ignore (usage error naming it)."""
  if channels_run and FLAGS.cooccurrence:
    raise app.UsageError("--cooccurrence fuses with a single-tower graph; a --channels run merges its own channels")
  if not channels_run and flag_use.given(_CHANNEL_FLAGS):
    raise app.UsageError(
      f"{flag_use.given(_CHANNEL_FLAGS)}: only for a `fgr-train --channels` run, and {FLAGS.checkpoint_dir} is not one "
      f"(it has no {channels_lib.CHANNELS_FILE})"
    )
  if not FLAGS.cooccurrence and flag_use.given(_COOCCURRENCE_FLAGS):
    raise app.UsageError(f"{flag_use.given(_COOCCURRENCE_FLAGS)}: only with --cooccurrence, which is off")
  if FLAGS["exclusion_depth"].present and not FLAGS.exclude_history:
    raise app.UsageError("--exclusion_depth: only with --exclude_history, which is off")
  if FLAGS["exclusion_depth"].present and channels_run:
    raise app.UsageError(
      "--exclusion_depth: not for a --channels run, whose exclusions come out of each channel's --channel_depth"
    )


def channel_options() -> channel_exporter.ChannelOptions:
  """The --channel_* and diversity flags (ValueError for a value a request's knob could not take)."""
  weights = {}
  for pair in FLAGS.channel_weights:
    name, sep, value = pair.partition("=")
    try:
      weights[name] = float(value)
    except ValueError:
      sep = ""
    if not sep or not name:
      raise app.UsageError(f"--channel_weights must look like name=weight, got {pair!r}")
  return channel_exporter.ChannelOptions(
    depth=FLAGS.channel_depth,
    weights=weights,
    min_relevance=FLAGS.min_relevance,
    diversity=FLAGS.diversity,
    window=FLAGS.diversity_window,
    gamma=FLAGS.ssd_gamma,
    theta=FLAGS.dpp_theta,
    calibration_examples=FLAGS.calibration_examples,
  )


def parse_options(pairs: list[str]) -> dict[str, object]:
  """Parses --index_options name=value pairs (see `exporter.parse_index_options`)."""
  try:
    return exporter.parse_index_options(pairs)
  except ValueError as e:
    raise app.UsageError(f"--index_options: {e}") from None


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.index not in base.available_backends():
    raise app.UsageError(f"--index must be one of {base.available_backends()}, got {FLAGS.index!r}")
  try:
    config = exporter.ExportConfig(
      index=FLAGS.index,
      k=FLAGS.k,
      index_options=parse_options(FLAGS.index_options),
      num_warmup_requests=FLAGS.num_warmup_requests,
      eval_queries=FLAGS.eval_queries,
      version=FLAGS.version,
      precision=FLAGS.precision,
      jit_compile=FLAGS.jit_compile,
      exclude_history=FLAGS.exclude_history,
      exclusion_depth=FLAGS.exclusion_depth,
      cooccurrence=FLAGS.cooccurrence,
      cooccurrence_neighbours=FLAGS.cooccurrence_neighbours,
      fusion_weight=FLAGS.fusion_weight,
      allow_signature_change=FLAGS.allow_signature_change,
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  versions.check_base_path(FLAGS.model_base_path)  # Before the graph is built and saved, which takes minutes.
  if config.version is not None:
    versions.check_free(FLAGS.model_base_path, config.version)
  else:
    versions.next_version(FLAGS.model_base_path)  # Refuses a base path whose numbers are used up.
  newest = versions.list_versions(FLAGS.model_base_path)
  if newest and not config.allow_signature_change:  # Compared after the build: a damaged one is said now.
    signatures.read_signatures(os.path.join(FLAGS.model_base_path, str(newest[-1])))
  channels_run = bool(channels_lib.read_channels(FLAGS.checkpoint_dir))
  check_flags_apply(channels_run)
  if channels_run:
    try:
      options = channel_options()
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    report = channel_exporter.export_channels(FLAGS.checkpoint_dir, FLAGS.model_base_path, config, options)
  else:
    report = exporter.export_model(FLAGS.checkpoint_dir, FLAGS.model_base_path, config)
  print(json.dumps(report))


if __name__ == "__main__":  # As its console script: a user's mistake is one line, not a traceback.
  from cli import launch

  launch.run_module(main)
