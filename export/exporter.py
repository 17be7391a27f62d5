"""Builds a full-graph SavedModel from a training run and publishes it as a new version."""

from __future__ import annotations

import ast
import dataclasses
import os
import time
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from engine import base, full_graph, stock_ops
from engine import cooccurrence as cooccurrence_lib
from export import refresh_state, signatures, verify, version_report, versions, warmup
from models import baselines, train
from models import catalog as catalog_lib
from models import precision as precision_lib
from models.data import queries as queries_lib
from models.data import schema, sources


@dataclasses.dataclass
class ExportConfig:
  """What to export.

  Attributes:
    index: index backend name (see `engine.base.available_backends()`).
    k: candidates returned per request.
    index_options: backend-specific configuration (see the backend's builder in engine/).
    num_warmup_requests: warm-up records written to assets.extra (TF Serving allows at most 1000).
    eval_queries: held-out queries used to measure the index's recall@k against exact search.
    tuning_queries: further held-out queries a backend tunes its search knobs on (not those above).
    precision: compute precision of the exported towers ("float32", "mixed_bfloat16",
      "mixed_float16"); None takes this device's default (`models.precision.serving_defaults`).
      Outputs stay float32 either way.
    jit_compile: XLA-compile the towers' numeric part; None takes this device's default. Stock TF
      Serving needs --xla_cpu_compilation_enabled to run an XLA-compiled export.
    version: explicit version number (a positive integer); the next free one when None.
    exclude_history: never return an item of the request's own behaviour history (`hist_ids`), as
      TFRS's `query_with_exclusions` does: for catalogs where a user does not take the same item
      twice (ratings, purchases of durables), each slot then holds a new item.
    exclusion_depth: with `exclude_history`, candidates searched beyond k to make up for excluded
      ones (the training history length by default).
    cooccurrence: fuse an item-to-item co-occurrence channel over `hist_ids`, fit on the training
      log (`engine.cooccurrence`), with the towers' search; both lists go k + exclusion_depth deep.
    cooccurrence_neighbours: the co-occurring items kept per item.
    fusion_weight: with `cooccurrence`, the towers' share of the rank fusion.
    allow_signature_change: publish even if the version's signatures would break the clients of the
      base path's newest version (`export.signatures`); refused otherwise.
  """

  index: str = base.DEFAULT_BACKEND
  k: int = 100
  index_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  num_warmup_requests: int = 20
  eval_queries: int = 500
  tuning_queries: int = 1000
  precision: str | None = None
  jit_compile: bool | None = None
  version: int | None = None
  exclude_history: bool = False
  exclusion_depth: int = schema.HISTORY_LEN
  cooccurrence: bool = False
  cooccurrence_neighbours: int = 100
  fusion_weight: float = 0.5
  allow_signature_change: bool = False

  def __post_init__(self):
    if self.k < 1:  # k above the catalog size is refused once the catalog is read (`build_graph`).
      raise ValueError(f"k must be at least 1 (the candidates returned per request), got {self.k}")
    base.backend(self.index).check_options(self.index_options)  # Before the catalog is embedded.
    if self.version is not None:
      versions.check_version(self.version)  # Before the build: a bad version would fail only at the publish.
    if self.exclusion_depth < 0:
      raise ValueError(f"exclusion_depth must be 0 or more, got {self.exclusion_depth}")
    if self.cooccurrence_neighbours < 1:
      raise ValueError(f"cooccurrence_neighbours must be at least 1, got {self.cooccurrence_neighbours}")
    if not 0 <= self.fusion_weight <= 1:
      raise ValueError(f"fusion_weight must be in [0, 1], got {self.fusion_weight}")
    if self.eval_queries < 1:
      raise ValueError(
        f"eval_queries must be at least 1 (the export measures recall@k on them), got {self.eval_queries}"
      )
    if self.tuning_queries < 0 or self.num_warmup_requests < 0:
      raise ValueError(
        f"tuning_queries and num_warmup_requests must be 0 or more, got {self.tuning_queries} and "
        f"{self.num_warmup_requests}"
      )

  @property
  def exclusions(self) -> str | None:
    """The query feature whose ids the graph never returns (`engine.full_graph.FullGraph`)."""
    return schema.HIST_IDS if self.exclude_history else None

  def report_exclusions(self) -> dict[str, Any]:
    """The same as `version_report.VersionReport` fields (None, so not written, when off)."""
    return {"exclusions": self.exclusions, "exclusion_depth": self.exclusion_depth if self.exclude_history else None}


def fit_cooccurrence(
  source: sources.Source, item_ids: np.ndarray, config: ExportConfig
) -> cooccurrence_lib.CooccurrenceChannel:
  """The co-occurrence channel over `item_ids`, fit on the training log as the ItemCF baseline is."""
  fitted = baselines.ItemCooccurrence(source.num_items).fit(source.examples("train"), source.row_of)
  rows, neighbours, similarities = fitted.top_neighbours(config.cooccurrence_neighbours)
  ids = base.string_array(item_ids)
  ids_by_row = np.full([source.num_items], "", dtype=object)  # The baseline counts by the source's rows.
  ids_by_row[[source.row_of(item_id) for item_id in ids]] = ids
  neighbour_ids = np.where(neighbours >= 0, ids_by_row[np.maximum(neighbours, 0)], "")
  table = cooccurrence_lib.NeighbourTable.from_ids(ids_by_row[rows], neighbour_ids, similarities)
  return cooccurrence_lib.CooccurrenceChannel(
    table, item_ids, schema.HIST_IDS, history=fitted.history, decay=fitted.decay
  )


def parse_index_options(pairs: list[str]) -> dict[str, Any]:
  """Parses name=value pairs; values are Python literals (numbers, booleans), `true`/`false`, or plain strings."""
  options: dict[str, Any] = {}
  for pair in pairs:
    name, sep, value = pair.partition("=")
    if not sep or not name:
      raise ValueError(f"index options must look like name=value, got {pair!r}")
    if value.lower() in ("true", "false"):  # As absl's boolean flags take them (not Python's literals only).
      options[name] = value.lower() == "true"
      continue
    try:
      options[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[name] = value
  return options


@dataclasses.dataclass
class BuiltGraph:
  """A full graph built in process, ready to publish.

  Attributes:
    graph: towers + index.
    catalog: the embedded catalog the index was built over.
    samples: held-out query features (the first ones are the warm-up requests).
    recall: the index's recall@k against exact search on held-out queries it was not tuned on.
    timings: seconds spent embedding and building, by step ("embed", "build").
    serving: the precision and XLA setting the towers were rebuilt with.
    data: the training run's data spec (JSON), recorded in the version's report.
  """

  graph: full_graph.FullGraph
  catalog: catalog_lib.EmbeddedCatalog
  samples: dict[str, np.ndarray]
  recall: float
  timings: dict[str, float]
  serving: precision_lib.ServingOptions
  data: dict[str, Any]


def build_graph(checkpoint_dir: str, config: ExportConfig) -> BuiltGraph:
  """Restores the newest checkpoint of a training run and builds its full graph in process."""
  timings: dict[str, float] = {}
  started = time.time()
  defaults = precision_lib.serving_defaults()
  serving = precision_lib.ServingOptions(
    precision=config.precision or defaults.precision,
    jit_compile=defaults.jit_compile if config.jit_compile is None else config.jit_compile,
  )
  model, run_config = train.restore(checkpoint_dir, precision=serving.precision, jit_compile=serving.jit_compile)
  source = sources.open_source(sources.DataSpec.from_json(run_config["data"]))
  # Before the catalog is embedded and indexed: each backend's build failed its own way, if at all.
  base.check_k(config.k, source.num_items)
  # The graph asks the index for k plus the exclusion depth: the index is checked, built and tuned for as
  # many, so the k answers left after the history are found at the recall it was tuned for.
  depth = full_graph.search_depth(config.k, config.exclusion_depth if config.exclude_history else 0, source.num_items)
  base.backend(config.index).check_values(config.index_options, depth, source.num_items)

  catalog = catalog_lib.embed_catalog(model.item_tower, source)
  timings["embed"] = time.time() - started

  # Held-out queries in disjoint slices: recall is measured on queries the index was not tuned on,
  # and tuning uses real queries (catalog points make poor stand-ins for them).
  samples = queries_lib.held_out_queries(
    source, max(config.eval_queries + config.tuning_queries, config.num_warmup_requests)
  )
  query_embeddings = tf.function(model.query_tower)(
    {name: tf.constant(values) for name, values in samples.items()}
  ).numpy()
  eval_embeddings = query_embeddings[: config.eval_queries]
  tuning_embeddings = query_embeddings[config.eval_queries :]

  started = time.time()
  index = base.build_index(
    config.index,
    catalog.embeddings,
    k=depth,
    eligible=catalog.eligible,
    tuning_queries=tuning_embeddings if len(tuning_embeddings) else None,
    **config.index_options,
  )
  timings["build"] = time.time() - started
  recall = verify.index_recall(index, eval_embeddings, catalog.embeddings, catalog.eligible, config.k)
  graph = full_graph.FullGraph(
    model.query_tower,
    model.item_tower,
    index,
    catalog.ids,
    config.k,
    schema.query_specs(),
    schema.item_specs(),
    exclusions=config.exclusions,
    exclusion_depth=config.exclusion_depth,  # Unused without exclusions.
    cooccurrence=fit_cooccurrence(source, catalog.ids, config) if config.cooccurrence else None,
    fusion_weight=config.fusion_weight,
  )
  return BuiltGraph(graph, catalog, samples, recall, timings, serving, run_config["data"])


def check_signatures(saved_model_dir: str, model_base_path: str, config: ExportConfig) -> None:
  """Raises ValueError if the saved version would break the clients of the newest one (unless allowed)."""
  if not config.allow_signature_change:
    newest = versions.list_versions(model_base_path)
    signatures.check_compatible(saved_model_dir, model_base_path, newest[-1] if newest else None)


def publish_graph(built: BuiltGraph, model_base_path: str, config: ExportConfig) -> dict[str, Any]:
  """Saves a built graph as BASE/<version>/ atomically, with warm-up records and its report.

  Returns:
    The export report (version, path, recall@k against exact, timings, index bytes) as JSON
    (`version_report.VersionReport`), also written to the version's assets.extra.
  """
  index, catalog, samples = built.graph.index, built.catalog, built.samples
  started = time.time()
  with versions.publish(model_base_path, config.version) as (temp_path, version):
    built.graph.save(temp_path)
    check_signatures(temp_path, model_base_path, config)
    warmup.write_warmup(temp_path, warmup.sample_requests(samples, config.num_warmup_requests))
    refresh_state.write_embeddings(temp_path, catalog.embeddings)  # What fgr-refresh updates.
    report = version_report.VersionReport(
      version=version,
      path=os.path.join(model_base_path, str(version)),
      index=config.index,
      k=config.k,
      **config.report_exclusions(),
      cooccurrence=full_graph.cooccurrence_config(built.graph),
      data=built.data,
      precision=built.serving.precision,
      jit_compile=built.serving.jit_compile,
      needs_xla=bool(stock_ops.xla_compiled_functions(temp_path)),
      index_options=config.index_options,
      index_config=dict(index.config),
      num_items=int(len(catalog.ids)),
      num_eligible=int(catalog.eligible.sum()),
      recall=round(built.recall, 4),
      index_bytes=index.nbytes(),
    )
    for step, seconds in built.timings.items():
      report.time(step, seconds, digits=2)
    version_report.write(temp_path, report)
  report.time("write", time.time() - started, digits=2)
  logging.info("Exported version %d to %s (its report: %s)", version, report.path, version_report.REPORT_PATH)
  return report.to_json()


def export_model(checkpoint_dir: str, model_base_path: str, config: ExportConfig) -> dict[str, Any]:
  """Exports the newest checkpoint of a training run as BASE/<version>/, atomically (see publish_graph)."""
  return publish_graph(build_graph(checkpoint_dir, config), model_base_path, config)
