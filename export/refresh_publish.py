"""Publishing a refreshed version: a new mask, a rebuilt index, or an earlier version republished.

Every publish goes through `versions.publish` (atomic, durable) and writes the new version's report.
A rebuilt index is written under N's own graph when that graph fits it (`refresh_checkpoint`): N's
saved_model.pb is hard-linked and nothing is traced, so a server can also reuse the graph it imported
for N. Otherwise the new version saves a module that reuses N's restored tower functions and variables
(`refresh_towers`): only the small serving functions around the new index are traced.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from engine import base, full_graph
from export import (
  refresh_checkpoint,
  refresh_policy,
  refresh_state,
  refresh_towers,
  verify,
  version_files,
  version_report,
  versions,
  warmup,
)

_EMBEDDINGS_PATH = os.path.join(version_files.EXTRA_DIR, refresh_state.EMBEDDINGS_FILE)


def refreshed_report(
  source_report: version_report.VersionReport,
  from_version: int,
  version: int,
  base_path: str,
  kind: str,
  ids: np.ndarray,
  eligible: np.ndarray,
  extra: dict[str, Any] | None = None,
) -> version_report.VersionReport:
  """The report of a version refreshed from one with `source_report`: its index as the source's, over a new catalog."""
  return version_report.VersionReport(
    version=version,
    path=os.path.join(base_path, str(version)),
    kind=kind,
    refreshed_from=from_version,
    index=source_report.index,
    k=source_report.k,
    exclusions=source_report.exclusions,
    exclusion_depth=source_report.exclusion_depth,
    cooccurrence=source_report.cooccurrence,
    data=source_report.data,
    precision=source_report.precision,  # Refreshes keep the source's towers and how they were built.
    jit_compile=source_report.jit_compile,
    needs_xla=source_report.needs_xla,
    index_options=source_report.index_options,
    index_config=source_report.index_config,
    num_items=int(len(ids)),
    num_eligible=int(eligible.sum()),
    extra=extra or {},
  )


def _refreshed_report(
  source: refresh_state.Source, version: int, base_path: str, kind: str, state: refresh_state.CatalogState
) -> version_report.VersionReport:
  return refreshed_report(source.report, source.version, version, base_path, kind, state.ids, state.eligible)


def publish_checkpoint_change(
  base_path: str,
  source_path: str,
  replacements: dict[str, Any],
  report_for: Callable[[int], version_report.VersionReport],
  version: int | None = None,
) -> version_report.VersionReport:
  """Publishes N's files, hard-linked, with `replacements` in its checkpoint: no load, no embedding, no build.

  Args:
    base_path: the model base path.
    source_path: version N's directory.
    replacements: checkpoint tensors to replace, by key (same shapes).
    report_for: the new version's report, given its number.
    version: explicit version number; the next free one when None.
  """
  started = time.perf_counter()
  with versions.publish(base_path, version) as (temp_path, version):
    version_files.link_tree(
      source_path, temp_path, skip=("variables", version_files.FINGERPRINT_FILE, version_report.REPORT_PATH)
    )
    refresh_checkpoint.rewrite_checkpoint(
      version_files.variables_prefix(source_path), version_files.variables_prefix(temp_path), replacements
    )
    refresh_checkpoint.write_fingerprint(temp_path)
    report = report_for(version)
    report.time("write", time.perf_counter() - started)
    version_report.write(temp_path, report)
  report.published_at = time.time()  # When servers can see it: after the rename.
  report.time("publish", time.perf_counter() - started)
  return report


def publish_status_only(
  base_path: str, source: refresh_state.Source, eligible: np.ndarray, version: int | None = None
) -> version_report.VersionReport:
  """Publishes N's graph and index with a new eligibility mask: no load, no embedding, no build."""
  base.backend(source.report.index).load_ops()
  state = dataclasses.replace(source.state, eligible=eligible)
  return publish_checkpoint_change(
    base_path,
    source.path,
    {full_graph.ELIGIBLE_KEY: eligible},
    lambda number: _refreshed_report(source, number, base_path, "status_only", state),
    version,
  )


def warmup_recall(
  version_path: str, towers: refresh_towers.LoadedTowers, index: base.Index, state: refresh_state.CatalogState, k: int
) -> float | None:
  """recall@k of `index` against exact search for the queries of a version's warm-up records."""
  queries = warmup.read_warmup_queries(version_path)
  if not queries or state.eligible.sum() < k:
    return None
  embeddings = [
    towers.encode_query(**{name: tf.constant(values) for name, values in query.items()})["embedding"]
    for query in queries
  ]
  recall = verify.index_recall(index, np.concatenate(embeddings), state.embeddings, state.eligible, k)
  return round(recall, 4)


def write_graph(
  source_path: str,
  temp_path: str,
  replacements: dict[str, Any] | None,
  retrace_reason: str | None,
  save_traced: Callable[[str], None],
  skip: tuple[str, ...] = (),
) -> None:
  """Writes a rebuilt version's graph: N's, hard-linked over a rewritten checkpoint when `replacements`
  says it fits (nothing is traced), else traced anew by `save_traced(temp_path)` beside N's warm-up
  records. `skip` names further files of N not to link (the ones the caller writes anew)."""
  if replacements is not None:
    version_files.link_tree(
      source_path,
      temp_path,
      skip=("variables", version_files.FINGERPRINT_FILE, version_report.REPORT_PATH, *skip),
    )
    refresh_checkpoint.rewrite_checkpoint(
      version_files.variables_prefix(source_path),
      version_files.variables_prefix(temp_path),
      replacements,
      resizable=replacements.keys(),
    )
    refresh_checkpoint.write_fingerprint(temp_path)
    return
  logging.info("Tracing the serving functions anew: %s", retrace_reason)
  save_traced(temp_path)
  os.makedirs(os.path.join(temp_path, version_files.EXTRA_DIR), exist_ok=True)
  warmup_path = version_files.extra_path(source_path, warmup.WARMUP_FILE)
  if os.path.exists(warmup_path):
    version_files.link_file(warmup_path, version_files.extra_path(temp_path, warmup.WARMUP_FILE))


def publish_rebuilt(
  base_path: str,
  source: refresh_state.Source,
  towers: refresh_towers.LoadedTowers,
  state: refresh_state.CatalogState,
  timings: dict[str, float],
  index_overrides: dict[str, Any] | None = None,
  verify_recall: bool = True,
  version: int | None = None,
  source_rows: np.ndarray | None = None,
  index_update: str = "auto",
  retrain_fraction: float = refresh_policy.DEFAULT_RETRAIN_FRACTION,
  retrained: refresh_policy.Retrained | None = None,
  background: bool = False,
) -> version_report.VersionReport:
  """Builds N's index type over `state` and publishes it with N's restored towers and warm-up records.

  Args:
    base_path: the model base path.
    source: version N.
    towers: N's restored towers.
    state: the catalog of the new version.
    timings: seconds spent so far, by step ("embed"); the build and write steps are added.
    index_overrides: index options replacing N's (e.g. a smaller training sample).
    verify_recall: after publishing, measure the new index's recall@k on N's warm-up queries.
    version: explicit version number; the next free one when None.
    source_rows: int64 [N'], the row of N each row of `state` copies unchanged (-1: new or changed);
      None trains the index anew.
    index_update: one of `refresh_policy.INDEX_UPDATES`.
    retrain_fraction, retrained, background: see `refresh_policy.rebuild_index`.
  """
  k = source.report.k
  options = refresh_policy.rebuild_options(source.report, index_overrides)
  started = time.perf_counter()
  if source_rows is None:
    source_rows, index_update = np.full([len(state.ids)], -1, np.int64), "full"
  index = refresh_policy.rebuild_index(
    source, state, source_rows, options, index_update, retrain_fraction, retrained, background
  )
  timings["build"] = time.perf_counter() - started

  replacements, retrace_reason = refresh_checkpoint.graph_replacements(source, index, state)
  started = time.perf_counter()
  with versions.publish(base_path, version) as (temp_path, version):
    write_graph(
      source.path,
      temp_path,
      replacements,
      retrace_reason,
      lambda path: full_graph.FullGraph(
        towers.query_tower,
        towers.item_tower,
        index,
        state.ids,
        k,
        towers.query_specs,
        towers.item_specs,
        exclusions=source.report.exclusions,
        exclusion_depth=source.report.exclusion_depth or 0,
        **refresh_checkpoint.saved_fusion(source, state.ids),
      ).save(path),
      skip=(_EMBEDDINGS_PATH,),
    )
    refresh_state.write_embeddings(temp_path, state.embeddings)
    report = _refreshed_report(source, version, base_path, "rebuild", state)
    report.graph = f"version {source.version}'s" if replacements is not None else "traced"
    report.graph_traced_because = retrace_reason
    report.index_options = options
    report.index_config = dict(index.config) or report.index_config
    report.index_update = report.index_config.get("update", "full")
    report.index_bytes = index.nbytes()
    version_report.write(temp_path, report)
  timings["write"] = time.perf_counter() - started
  report.published_at = time.time()
  if verify_recall:  # After the publish: a report, not a delay on the way to serving.
    started = time.perf_counter()
    report.warmup_recall = warmup_recall(source.path, towers, index, state, k)
    timings["verify"] = time.perf_counter() - started
  for step, seconds in timings.items():
    report.time(step, seconds)
  return report


def rollback(base_path: str, version: int) -> version_report.VersionReport:
  """Republishes an earlier version's files (hard-linked) as a new, newest version."""
  source_path = os.path.join(base_path, str(version))
  if version not in versions.list_versions(base_path):
    raise FileNotFoundError(f"No complete version {version} under {base_path} to roll back to")
  started = time.perf_counter()
  with versions.publish(base_path) as (temp_path, new_version):
    version_files.link_tree(source_path, temp_path, skip=(version_report.REPORT_PATH,))
    fields = {
      "version": new_version,
      "path": os.path.join(base_path, str(new_version)),
      "kind": "rollback",
      "refreshed_from": version,
    }
    if version_report.exists(source_path):
      report = dataclasses.replace(version_report.read(source_path), **fields)
    else:
      report = version_report.VersionReport(**fields)
    version_report.write(temp_path, report)
  report.published_at = time.time()  # When servers can see it: after the rename.
  report.time("publish", time.perf_counter() - started)
  return report
