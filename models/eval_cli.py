"""fgr-eval: Recall/HitRate@K, NDCG@K and water-level metrics of a training run on its test split.

The split is the one the run was trained with (`fgr-train --split`): the TFRS protocol's seeded
80/20 split, the last share of events in time, or a temporal leave-last-out split. Retrieval is
exact over the whole catalog; popularity and item co-occurrence are reported beside the towers.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from models import evaluation
from models import train as train_lib
from models.data import sources

FLAGS = flags.FLAGS

flags.DEFINE_string("output_dir", None, "The --output_dir of the fgr-train run to evaluate.")
flags.DEFINE_list("ks", ["10", "50", "100"], "Cut-offs K; water-level metrics use the largest.")
flags.DEFINE_integer("max_examples", 0, "Evaluate only the first test examples (0: all of them).")
flags.DEFINE_string("report_file", "", "Also write the JSON report to this file.")
flags.DEFINE_bool("baselines", True, "Also evaluate popularity and item co-occurrence on the same split.")
flags.mark_flag_as_required("output_dir")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  model, run_config = train_lib.restore(FLAGS.output_dir)
  data = sources.DataSpec.from_json(run_config["data"])
  report = {
    "data": data.to_json(),
    **evaluation.evaluate(
      model.query_tower,
      model.item_tower,
      sources.open_source(data),
      ks=tuple(int(k) for k in FLAGS.ks),
      max_examples=FLAGS.max_examples,
      with_baselines=FLAGS.baselines,
    ),
  }
  logging.info("Evaluation report: %s", report)
  text = json.dumps(report, indent=2)
  if FLAGS.report_file:
    with open(FLAGS.report_file, "w") as f:
      f.write(text + "\n")
  print(text)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
