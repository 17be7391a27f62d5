"""fgr-eval: judges a training run, or a published channel graph, on its test split.

`--output_dir` (a fgr-train run): Recall/HitRate@K, NDCG@K and water-level metrics, retrieving
exactly over the whole catalog, with popularity and item co-occurrence beside the towers. The split
is the one the run was trained with (`fgr-train --split`).

`--model_path` (a version fgr-export wrote from a `fgr-train --channels` run): coverage of clicks
and conversions, noise ratio, revenue proxy, ILAD and category coverage of each channel alone, of
the merged list and of its SSD and DPP re-rankings, through the version's own signature
(`export.served_evaluation`).
"""

from __future__ import annotations

from absl import app, flags, logging

from export import channel_exporter, report_file, served_evaluation, version_report
from models import evaluation
from models import train as train_lib
from models.data import sources

FLAGS = flags.FLAGS

flags.DEFINE_string("output_dir", None, "The --output_dir of the fgr-train run to evaluate.")
flags.DEFINE_string(
  "model_path",
  None,
  "Or a version directory (BASE/<version>) to judge through its own signatures: a full graph's answers "
  "(beside the baselines), or a channel graph's channels, merge and re-rankings.",
)
flags.DEFINE_list(
  "ks",
  ["10", "50", "100"],
  "Cut-offs K; water-level metrics use the largest. With --model_path, a full graph's default is 10, 50 "
  "and 100 below its k, and k; a channel graph is judged at its k.",
)
flags.DEFINE_integer("max_examples", 0, "Evaluate only the first test examples (0: all of them).")
flags.DEFINE_string("report_file", "", "Also write the JSON report to this file.")
flags.DEFINE_bool(
  "baselines",
  True,
  "Also evaluate popularity and item co-occurrence on the same split (a channel graph compares its own "
  "channels instead).",
)
flags.DEFINE_bool(
  "exclude_history",
  False,
  "Recall no item of the query's own history, for the model and the baselines alike (what a graph "
  "exported with --exclude_history serves).",
)
flags.mark_flags_as_mutual_exclusive(["output_dir", "model_path"], required=True)


def parse_ks(values: list[str]) -> tuple[int, ...]:
  """The --ks cut-offs as integers; a usage error unless each is a whole number of at least 1."""
  if not values:
    raise app.UsageError("--ks needs at least one cut-off K")
  try:
    ks = tuple(int(k) for k in values)
  except ValueError:
    raise app.UsageError(f"--ks must be whole numbers, got {values}") from None
  if min(ks) < 1:
    # A metric at K=0 divides by zero: the report would hold NaN, which is not JSON.
    raise app.UsageError(f"--ks must all be at least 1, got {values}")
  return ks


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  ks = parse_ks(FLAGS.ks)  # Before the run is restored: a usage error should not wait for it.
  if FLAGS.max_examples < 0:
    # -1 evaluated every example with --output_dir and none with --model_path ("no test examples").
    raise app.UsageError(f"--max_examples must be 0 (all) or more, got {FLAGS.max_examples}")
  if FLAGS.report_file:
    report_file.check(FLAGS.report_file)  # Nor a report that could not be written.
  if FLAGS.model_path:
    if FLAGS.exclude_history:
      raise app.UsageError("--exclude_history judges a training run; a version serves its own (fgr-export's flag)")
    version = version_report.read(FLAGS.model_path)
    if version.data is None:
      raise app.UsageError(f"{FLAGS.model_path}'s report names no training data (exported before it did): re-export it")
    data = sources.DataSpec.from_json(version.data)
    source = sources.open_source(data)
    explicit_ks = ks if FLAGS["ks"].present else None
    if channel_exporter.is_channel_version(version):
      if explicit_ks:
        raise app.UsageError(
          f"{FLAGS.model_path} is a channel graph, judged at its k ({version.k}) and ILAD@10/50: --ks does not apply"
        )
      evaluated = served_evaluation.evaluate_version(FLAGS.model_path, source, FLAGS.max_examples)
    else:
      evaluated = served_evaluation.evaluate_full_graph(
        FLAGS.model_path, source, FLAGS.max_examples, with_baselines=FLAGS.baselines, ks=explicit_ks
      )
    report = {"data": data.to_json(), **evaluated}
  else:
    model, run_config = train_lib.restore(FLAGS.output_dir)
    data = sources.DataSpec.from_json(run_config["data"])
    changed = train_lib.changed_inputs(run_config)
    if changed:
      logging.warning(
        "%s changed since %s trained: its held-out split now holds other examples than the run held out",
        ", ".join(changed),
        FLAGS.output_dir,
      )
    report = {
      "data": data.to_json(),
      **({"inputs_changed_since_training": changed} if changed else {}),
      **evaluation.evaluate(
        model.query_tower,
        model.item_tower,
        sources.open_source(data),
        ks=ks,
        max_examples=FLAGS.max_examples,
        with_baselines=FLAGS.baselines,
        exclude_history=FLAGS.exclude_history,
      ),
    }
  report_file.publish(report_file.to_json(report), FLAGS.report_file)


if __name__ == "__main__":  # As its console script: a user's mistake is one line, not a traceback.
  from cli import launch

  launch.run_module(main)
