"""Builds a full-graph SavedModel from a training run and publishes it as a new version."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from engine import base, full_graph
from export import refresh_state, verify, versions, warmup
from models import catalog as catalog_lib
from models import train
from models.data import queries as queries_lib
from models.data import schema, sources

REPORT_FILE = "export_report.json"


@dataclasses.dataclass
class ExportConfig:
  """What to export.

  Attributes:
    index: index backend name (see `engine.base.available_backends()`).
    k: candidates returned per request.
    index_options: backend-specific configuration, e.g. {"num_leaves": 1000}.
    num_warmup_requests: warm-up records written to assets.extra (TF Serving allows at most 1000).
    eval_queries: held-out queries used to measure the index's recall@k against exact search.
    version: explicit version number; the next free one when None.
  """

  index: str = "scann"
  k: int = 100
  index_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  num_warmup_requests: int = 20
  eval_queries: int = 500
  version: int | None = None


def parse_index_options(pairs: list[str]) -> dict[str, Any]:
  """Parses name=value pairs; values are Python literals (numbers, booleans) or plain strings."""
  options: dict[str, Any] = {}
  for pair in pairs:
    name, sep, value = pair.partition("=")
    if not sep or not name:
      raise ValueError(f"index options must look like name=value, got {pair!r}")
    try:
      options[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[name] = value
  return options


def export_model(checkpoint_dir: str, model_base_path: str, config: ExportConfig) -> dict[str, Any]:
  """Exports the newest checkpoint of a training run as BASE/<version>/, atomically.

  Returns:
    The export report (version, path, recall@k against exact, timings, index bytes), also written to
    assets.extra/export_report.json in the version.
  """
  timings: dict[str, float] = {}
  started = time.time()
  model, run_config = train.restore(checkpoint_dir)
  source = sources.open_source(sources.DataSpec.from_json(run_config["data"]))

  catalog = catalog_lib.embed_catalog(model.item_tower, source)
  timings["embed_seconds"] = time.time() - started

  started = time.time()
  index = base.build_index(config.index, catalog.embeddings, k=config.k, eligible=catalog.eligible,
                           **config.index_options)
  timings["build_seconds"] = time.time() - started

  samples = queries_lib.held_out_queries(source, max(config.eval_queries, config.num_warmup_requests))
  query_embeddings = tf.function(model.query_tower)(
      {name: tf.constant(values) for name, values in samples.items()}).numpy()
  recall = verify.index_recall(index, query_embeddings[:config.eval_queries], catalog.embeddings,
                               catalog.eligible, config.k)

  graph = full_graph.FullGraph(model.query_tower, model.item_tower, index, catalog.ids, config.k,
                               schema.query_specs(), schema.item_specs())
  started = time.time()
  with versions.publish(model_base_path, config.version) as (temp_path, version):
    graph.save(temp_path)
    requests = [warmup.predict_request({name: values[i:i + 1] for name, values in samples.items()})
                for i in range(config.num_warmup_requests)]
    warmup.write_warmup(temp_path, requests)
    refresh_state.write_embeddings(temp_path, catalog.embeddings)  # What fgr-refresh updates.
    report = {
        "version": version,
        "path": os.path.join(model_base_path, str(version)),
        "index": config.index,
        "k": config.k,
        "index_options": config.index_options,
        "index_config": dict(getattr(index, "config", {})),
        "num_items": int(len(catalog.ids)),
        "num_eligible": int(catalog.eligible.sum()),
        f"recall_at_{config.k}_vs_exact": round(recall, 4),
        "index_bytes": index.nbytes(),
        **{name: round(seconds, 2) for name, seconds in timings.items()},
    }
    with open(os.path.join(temp_path, "assets.extra", REPORT_FILE), "w") as f:
      json.dump(report, f, indent=2)
  report["write_seconds"] = round(time.time() - started, 2)
  logging.info("Exported version %d to %s: %s", version, report["path"], report)
  return report

