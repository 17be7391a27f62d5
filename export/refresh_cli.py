"""fgr-refresh: publishes a new version from the served one and a catalog delta, without retraining.

fgr-refresh --model_base_path=models/ads --delta=changes.jsonl        # one delta, one new version
fgr-refresh --model_base_path=models/ads --watch=deltas/ --interval=60s  # continuous
fgr-refresh --model_base_path=models/ads --rollback=7                 # republish version 7 as the newest
"""

from __future__ import annotations

import json
import re
import signal

from absl import app, flags, logging

from export import exporter, refresh, refresh_delta, refresh_policy, refresh_watch

FLAGS = flags.FLAGS

flags.DEFINE_string("model_base_path", None, "Model base path holding BASE/<version>/ (written by fgr-export).")
flags.DEFINE_list("delta", [], "Catalog delta files (docs/data_format.md), applied in order as one new version.")
flags.DEFINE_integer("from_version", None, "Version to refresh; defaults to the newest.")
flags.DEFINE_integer("keep_versions", 5, "After publishing, keep this many newest versions (0 keeps all).")
flags.DEFINE_bool(
  "defer_prune",
  True,
  "With --watch, delete the versions beyond --keep_versions (and free the "
  "previous catalog) when the next publish starts rather than right after a publish (one more "
  "version stays on disk meanwhile), so that neither competes with servers loading the new version.",
)
flags.DEFINE_integer("rollback", None, "Republish this earlier version as a new, newest version.")
flags.DEFINE_string("watch", None, "Directory to watch for delta files (*.jsonl); publishes on a schedule.")
flags.DEFINE_string("interval", "60s", "Watch schedule: seconds, or a number with s, m or h (e.g. 60s, 5m).")
flags.DEFINE_string(
  "settle",
  f"{refresh_watch.DEFAULT_SETTLE_SECONDS:g}s",
  "With --watch, read a delta file only once its size and mtime have not changed for this long (a "
  "writer that does not rename its files in may still be writing it); 0 for writers that all rename.",
)
flags.DEFINE_integer(
  "keep_processed_files",
  refresh_watch.DEFAULT_KEEP_FILES,
  "With --watch, keep only this many newest delta files in each of processed/ and failed/ (0 keeps all).",
)
flags.DEFINE_list(
  "index_options",
  [],
  "Index options replacing the source version's in rebuilds, as name=value "
  "pairs (e.g. training_sample_size=50000 for a faster build).",
)
flags.DEFINE_bool(
  "verify_recall",
  True,
  "After each rebuild, report recall@k against exact search on the "
  "version's warm-up queries (after publishing: it does not delay the new version).",
)
flags.DEFINE_enum(
  "index_update",
  "auto",
  list(refresh_policy.INDEX_UPDATES),
  "auto: update the source's index from its training (its trained partitioner and codebook; only "
  "new and changed ads encoded), for backends that support it, until --retrain_fraction of the "
  "catalog was encoded since the last training, then train anew; full: train the index anew on "
  "every rebuild.",
)
flags.DEFINE_float(
  "retrain_fraction",
  refresh_policy.DEFAULT_RETRAIN_FRACTION,
  "With --index_update=auto, train the index anew once this share of the catalog has been "
  "encoded incrementally since the last training.",
)
flags.DEFINE_bool(
  "background_retrain",
  True,
  "With --watch and --index_update=auto: past --retrain_fraction, train the index anew in a "
  "background thread and keep publishing incremental updates meanwhile (the one-shot --delta "
  "mode trains on the publish path).",
)
flags.DEFINE_integer("max_polls", 0, "With --watch, stop after this many polls (0: run until stopped).")
flags.mark_flag_as_required("model_base_path")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smh]?)$")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, flag: str = "interval", allow_zero: bool = False) -> float:
  """Seconds in "90", "90s", "1.5m" or "1h"; `flag` names the flag in the error."""
  match = _DURATION.match(text.strip())
  if not match or float(match.group(1)) < 0 or (float(match.group(1)) == 0 and not allow_zero):
    kind = "a duration" if allow_zero else "a positive duration"
    raise app.UsageError(f"--{flag} must be {kind} such as 60s or 5m, got {text!r}")
  return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _print_report(result: refresh_watch.PollResult) -> None:
  if result.report is not None:
    print(json.dumps(result.report), flush=True)


def _exit_on_stop_signals() -> None:
  """SIGTERM (how an orchestrator stops a watcher) and SIGINT end the process through SystemExit, so a
  publish under way removes its temporary directory on the way out. Python's default SIGTERM exits
  at once and left it behind (hundreds of MB at 1M ads, pruned only an hour later), and SIGINT
  printed a KeyboardInterrupt traceback."""

  def stop(signum: int, frame: object) -> None:
    del frame
    logging.warning("%s: stopping; a publish under way is abandoned", signal.Signals(signum).name)
    raise SystemExit(128 + signum)

  for stop_signal in (signal.SIGTERM, signal.SIGINT):
    signal.signal(stop_signal, stop)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _exit_on_stop_signals()
  modes = [bool(FLAGS.delta), FLAGS.rollback is not None, FLAGS.watch is not None]
  if sum(modes) != 1:
    raise app.UsageError("Give exactly one of --delta, --rollback or --watch")
  if FLAGS.rollback is not None and FLAGS.rollback < 1:
    raise app.UsageError(f"--rollback names a version (1 or more), got {FLAGS.rollback}")
  if FLAGS.from_version is not None and FLAGS.from_version < 1:
    raise app.UsageError(f"--from_version names a version (1 or more), got {FLAGS.from_version}")
  if FLAGS.keep_versions < 0:
    raise app.UsageError(f"--keep_versions must be 0 (keep all) or more, got {FLAGS.keep_versions}")
  if FLAGS.keep_processed_files < 0:
    raise app.UsageError(f"--keep_processed_files must be 0 (keep all) or more, got {FLAGS.keep_processed_files}")
  interval = parse_duration(FLAGS.interval)
  settle = parse_duration(FLAGS.settle, "settle", allow_zero=True)
  if not 0 <= FLAGS.retrain_fraction <= 1:
    raise app.UsageError(f"--retrain_fraction must be in [0, 1], got {FLAGS.retrain_fraction}")
  try:
    overrides = exporter.parse_index_options(FLAGS.index_options)
  except ValueError as e:
    raise app.UsageError(f"--index_options: {e}") from None
  refresher = refresh.Refresher(
    FLAGS.model_base_path,
    from_version=FLAGS.from_version,
    keep_versions=FLAGS.keep_versions or None,
    defer_prune=FLAGS.defer_prune and FLAGS.watch is not None,
    index_overrides=overrides,
    verify_recall=FLAGS.verify_recall,
    index_update=FLAGS.index_update,
    retrain_fraction=FLAGS.retrain_fraction,
    background_retrain=FLAGS.background_retrain and FLAGS.watch is not None,
  )
  if FLAGS.rollback is None:
    try:  # Before any delta is read: a bad override would be saved into every later version's report.
      refresher.check_index_overrides()
    except refresh.IndexOptionsError as e:
      raise app.UsageError(f"--index_options: {e}") from None
  if FLAGS.rollback is not None:
    print(json.dumps(refresher.rollback(FLAGS.rollback)))
  elif FLAGS.delta:
    delta = refresh_delta.CatalogDelta()
    for path in FLAGS.delta:  # Every file is read and checked before anything is published.
      delta.merge(refresh_delta.read_delta(path))
    if not delta:  # A mistake in the files, not in the command line: one line, not the usage text.
      raise ValueError(f"the delta files {FLAGS.delta} change nothing (empty, or only blank lines)")
    print(json.dumps(refresher.apply(delta)))
  else:
    refresh_watch.watch(
      refresher,
      FLAGS.watch,
      interval,
      max_polls=FLAGS.max_polls,
      on_poll=_print_report,
      settle_seconds=settle,
      keep_files=FLAGS.keep_processed_files,
    )


if __name__ == "__main__":  # As its console script: a user's mistake is one line, not a traceback.
  from cli import launch

  launch.run_module(main)
