"""Full-graph speed on this device: float32, mixed_bfloat16 and mixed_float16 towers, each with and without XLA.

Every variant is the same full graph (query tower + index, `engine.full_graph.FullGraph`, as
fgr-export builds it) over the same catalog, called through its `serving_default` concrete function.
Calls are interleaved round-robin across variants, so load from other jobs on a shared machine hits
them all alike. For each variant it reports p50/p90 latency at each batch size, the latency of the
query tower alone (`encode_query`), and the overlap of its top-k with the float32 graph's.

  python -m bench.model_speed --checkpoint_dir=runs/ads --index=scann
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from typing import Any

import numpy as np
import tensorflow as tf
from absl import app, flags

from bench.fixtures import latency, towers
from cli import launch
from engine import base, full_graph
from export import exporter, report_file
from models import catalog as catalog_lib
from models import config as config_lib
from models import retrieval
from models import train as train_lib
from models.data import schema, sources

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint_dir", "", "A fgr-train run; empty: untrained default towers on synthetic data.")
flags.DEFINE_string("index", "scann", "Index backend of the full graph (fgr-export's --index).")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Queries per call.")
flags.DEFINE_integer("rounds", 200, "Timed calls per variant and batch size (after warm-up).")
flags.DEFINE_integer("k", 100, "Candidates per query.")
flags.DEFINE_string("report_file", "", "Also write the JSON results here.")
flags.DEFINE_list("precisions", list(config_lib.PRECISIONS), "Tower precisions to compare.")
flags.DEFINE_bool(
  "sequence_encoder_towers",
  False,
  "Also time float32 towers with fgr-train's --sequence_encoder=self_attention, with and without XLA "
  "(untrained; not from --checkpoint_dir).",
)
flags.DEFINE_bool(
  "exclude_history", False, "Also time float32 towers with fgr-export's --exclude_history (the history's 20 ids)."
)
flags.DEFINE_bool(
  "cooccurrence",
  False,
  "Also time float32 towers with fgr-export's --exclude_history --cooccurrence (the item-to-item channel "
  "fit on the data's training log, fused with the index's top-k).",
)

_SYNTHETIC = {"num_ads": 20_000, "num_users": 5_000, "num_sessions": 4_000, "seed": 0}


def _model(
  precision: str, jit_compile: bool, sequence_encoder: bool = False
) -> tuple[retrieval.RetrievalModel, sources.DataSpec]:
  if FLAGS.checkpoint_dir and not sequence_encoder:
    model, run_config = train_lib.restore(FLAGS.checkpoint_dir, precision=precision, jit_compile=jit_compile)
    return model, sources.DataSpec.from_json(run_config["data"])
  tf.keras.utils.set_random_seed(0)  # Same initial weights in every variant.
  tower = towers.SEQUENCE_TOWER if sequence_encoder else config_lib.TowerConfig()
  model = retrieval.build_towers_for_restore(dataclasses.replace(tower, precision=precision))
  model.query_tower.jit_compile = model.item_tower.jit_compile = jit_compile
  return model, sources.DataSpec(name="synthetic", synthetic=_SYNTHETIC)


def _queries(source: sources.Source, count: int) -> dict[str, np.ndarray]:
  batch = next(iter(source.examples("test")))
  rows = np.arange(count) % len(batch[schema.USER_ID])
  return {name: batch[name][rows] for name in schema.QUERY_FEATURE_NAMES}


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.report_file:
    try:  # Before measuring: a report that could not be written was found out after minutes, and lost.
      report_file.check(FLAGS.report_file, make_directory=True)
    except (OSError, ValueError) as e:
      raise app.UsageError(str(e)) from None
  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  # (precision, XLA, sequence encoder, history excluded, co-occurrence fused)
  variants = [(precision, xla, False, False, False) for precision in FLAGS.precisions for xla in (False, True)]
  if FLAGS.sequence_encoder_towers:
    variants += [("float32", False, True, False, False), ("float32", True, True, False, False)]
  if FLAGS.exclude_history or FLAGS.cooccurrence:
    variants += [("float32", False, False, True, False)]
  if FLAGS.cooccurrence:
    variants += [("float32", False, False, True, True)]
  functions: dict[tuple[str, bool, bool, bool, bool], dict[str, Any]] = {}
  catalog = source = None
  for precision, xla, sequence_encoder, exclude, fused in variants:
    model, data = _model(precision, xla, sequence_encoder)
    if catalog is None:  # One catalog, embedded by the float32 towers, for every variant.
      source = sources.open_source(data)
      catalog = catalog_lib.embed_catalog(model.item_tower, source)
    options = {"jit_compile": xla} if FLAGS.index == "brute_force" else {}
    index = base.build_index(FLAGS.index, catalog.embeddings, k=FLAGS.k, eligible=catalog.eligible, **options)
    graph_options = {"exclusions": schema.HIST_IDS, "exclusion_depth": schema.HISTORY_LEN} if exclude else {}
    if fused:
      graph_options["cooccurrence"] = exporter.fit_cooccurrence(source, catalog.ids, exporter.ExportConfig())
    graph = full_graph.FullGraph(
      model.query_tower,
      model.item_tower,
      index,
      catalog.ids,
      FLAGS.k,
      schema.query_specs(),
      schema.item_specs(),
      **graph_options,
    )
    signatures = graph.signatures()
    functions[(precision, xla, sequence_encoder, exclude, fused)] = {
      "graph": graph,
      "serve": signatures[full_graph.SERVING_DEFAULT],
      "encode": signatures[full_graph.ENCODE_QUERY],
    }
  queries = {b: {name: tf.constant(values) for name, values in _queries(source, b).items()} for b in batch_sizes}

  results: dict[str, Any] = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
    "command": " ".join(["python -m bench.model_speed"] + sys.argv[1:]),
    "index": FLAGS.index,
    "num_items": int(len(catalog.ids)),
    "k": FLAGS.k,
    "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
    "variants": {},
  }
  reference = functions[variants[0]]["serve"](**queries[max(batch_sizes)])["ids"].numpy()
  rng = np.random.default_rng(0)
  for key, fns in functions.items():
    ids = fns["serve"](**queries[max(batch_sizes)])["ids"].numpy()
    overlap = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ids, reference)])
    results["variants"][_name(*key)] = {
      "precision": key[0],
      "jit_compile": key[1],
      "sequence_encoder": key[2],
      "exclude_history": key[3],
      "cooccurrence": key[4],
      "top_k_overlap_with_float32": round(float(overlap), 4),
    }
  for kind in ("serve", "encode"):
    for b in batch_sizes:
      times: dict[tuple[str, bool, bool, bool, bool], list[float]] = {key: [] for key in functions}
      for fns in functions.values():  # Warm-up (XLA compiles on the first call of each shape).
        for _ in range(5):
          fns[kind](**queries[b])
      for _ in range(FLAGS.rounds):
        for i in rng.permutation(len(variants)):
          key = variants[i]
          started = time.perf_counter()
          fns = functions[key]
          out = fns[kind](**queries[b])
          next(iter(out.values())).numpy()
          times[key].append(time.perf_counter() - started)
      for key, values in times.items():
        results["variants"][_name(*key)].update(
          {f"{kind}_b{b}_{name}": value for name, value in latency.percentiles(values, (50, 90), digits=3).items()}
        )
  first = f"serve_b{batch_sizes[0]}_p50_ms"
  results["fastest"] = min(results["variants"], key=lambda name: results["variants"][name][first])
  report_file.publish(json.dumps(results, indent=2), FLAGS.report_file)  # Printed first, then written whole.
  print(markdown(results, batch_sizes))


def _name(precision: str, xla: bool, sequence_encoder: bool, exclude: bool, fused: bool) -> str:
  return (
    precision
    + (" + XLA" if xla else "")
    + (", sequence encoder" if sequence_encoder else "")
    + (", history excluded" if exclude else "")
    + (", co-occurrence fused" if fused else "")
  )


def markdown(results: dict[str, Any], batch_sizes: list[int]) -> str:
  """The results as a Markdown table, one row per variant."""
  header = (
    ["variant"]
    + [f"full graph b={b} p50 / p90 ms" for b in batch_sizes]
    + [f"query tower b={b} p50 ms" for b in batch_sizes]
    + ["top-k overlap vs float32"]
  )
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, v in results["variants"].items():
    cells = (
      [name]
      + [f"{v[f'serve_b{b}_p50_ms']:.2f} / {v[f'serve_b{b}_p90_ms']:.2f}" for b in batch_sizes]
      + [f"{v[f'encode_b{b}_p50_ms']:.2f}" for b in batch_sizes]
      + [f"{v['top_k_overlap_with_float32']:.3f}"]
    )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  launch.run_module(main)
