"""How a refresh rebuilds the source version's index: updated from its training, or trained anew.

An update keeps the version's trained structure and tuned search knobs and encodes only new and
changed rows (for backends that support it, `engine.base.Backend.updatable`). Recall drifts as the
catalog moves away from what the structure was trained on, so the index config counts the rows encoded
since the last training, and past a share of the catalog the index is trained anew, as fgr-export would.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from absl import logging

from engine import base, full_graph
from export import refresh_state, version_files, version_report

# "auto" updates the source's index from its training until too many rows were encoded since that
# training, then trains anew; "full" always trains anew.
INDEX_UPDATES = ("auto", "full")
DEFAULT_RETRAIN_FRACTION = 0.2


@dataclasses.dataclass
class Retrained:
  """A finished background retrain (`refresh_retrain`) to update the next index from.

  Attributes:
    trained: what the backend's `update` reuses (`engine.base.Backend.trained`).
    rows: int64 [N'], the row of the retrain's snapshot each row of the new catalog copies, or -1.
    config: the retrain's build config.
  """

  trained: Any
  rows: np.ndarray
  config: dict[str, Any]


def index_k(report: version_report.VersionReport, num_items: int | None = None) -> int:
  """The neighbours a version's graph asks its index for, which its index is built, tuned and checked for:
  k plus the exclusion depth, at most `num_items` (`engine.full_graph.search_depth`; None: the report's)."""
  exclusion_depth = report.exclusion_depth or 0
  num_items = num_items or report.num_items or report.k + exclusion_depth
  return full_graph.search_depth(report.k, exclusion_depth, num_items)


def rebuild_options(report: version_report.VersionReport, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """The source's index options plus the knobs its build tuned (so the rebuild does not tune again), with
  the refresher's `overrides` (`engine.base.Backend.rebuild_options`).

  A refresh adds no serving requirement its source lacked: an index that takes `jit_compile` is rebuilt
  without XLA when the source's graph needed none and its options leave the switch to the default (an
  int8 version exported before int8 scored under XLA by default), so a server without XLA still loads it.
  """
  backend = base.backend(report.index)
  options = backend.rebuild_options(report.index_options, report.index_config, index_k(report), overrides)
  if report.needs_xla is False and "jit_compile" not in options and backend.takes("jit_compile"):
    options["jit_compile"] = False
  return options


def full_build_reason(
  source: refresh_state.Source,
  options: dict[str, Any],
  fresh_rows: int,
  num_rows: int,
  update: str,
  retrain_fraction: float,
  background: bool = False,
) -> str | None:
  """Why the index must be trained anew rather than updated from the source's training (None: it need not)."""
  config, name = source.report.index_config, source.report.index
  if update == "full":
    return "--index_update=full"
  if not base.backend(name).updatable:
    return f"the {name} backend has no incremental update"
  changed = base.backend(name).structure_changes(config, options)
  if changed:
    return f"index options {changed} differ from version {source.version}'s build"
  encoded = config.get("rows_encoded_since_training", 0) + fresh_rows
  if encoded > retrain_fraction * num_rows and not background:
    return f"{encoded} of {num_rows} rows encoded since the last training (over {retrain_fraction:g})"
  return None


def rebuild_index(
  source: refresh_state.Source,
  state: refresh_state.CatalogState,
  source_rows: np.ndarray,
  options: dict[str, Any],
  update: str = "auto",
  retrain_fraction: float = DEFAULT_RETRAIN_FRACTION,
  retrained: Retrained | None = None,
  background: bool = False,
  index_path: str = full_graph.INDEX,
) -> base.Index:
  """The source's index type over `state`: updated from the source's training when it can be.

  The update (`engine.base.Backend.update`) keeps the source's trained structure and tuned search
  knobs, copies what it computed for the rows `source_rows` maps to the source, and encodes only the
  others. Past `retrain_fraction` of the catalog encoded since the last training (or when `options`
  change what the index trains) the index is trained anew.

  Args:
    source: the version refreshed.
    state: the new catalog.
    source_rows: int64 [N'], the row of the source that new row i copies unchanged, or -1.
    options: the source's index options with the refresher's overrides.
    update: one of INDEX_UPDATES.
    retrain_fraction: share of the catalog encoded since training beyond which a full build runs.
    retrained: a finished background retrain: the update starts from its training instead of the
      source's, its `rows` taking the place of `source_rows`.
    background: a background retrain takes care of the threshold: past it, keep updating.
    index_path: the index's object path in the source's checkpoint (a channel graph has one per channel).
  """
  if update not in INDEX_UPDATES:
    raise ValueError(f"index update must be one of {INDEX_UPDATES}, got {update!r}")
  backend = base.backend(source.report.index)
  fresh_rows = int((source_rows < 0).sum())
  reason = full_build_reason(
    source, options, fresh_rows, len(state.ids), update, retrain_fraction, background or retrained is not None
  )
  started = time.perf_counter()
  if reason is None:
    try:
      if retrained is not None:
        trained, source_rows, config = retrained.trained, retrained.rows, retrained.config
        fresh_rows, kind, encoded_before = int((source_rows < 0).sum()), "retrained", 0
      else:
        trained = backend.read_trained(version_files.variables_prefix(source.path), index_path, source.state.embeddings)
        config = source.report.index_config
        kind, encoded_before = "incremental", config.get("rows_encoded_since_training", 0)
      # This build trained nothing; its time is the update's (the source's build_seconds would mislead).
      config = {name: value for name, value in config.items() if name != "full_build_reason"}
      config.update(
        {
          "update": kind,
          "encoded_rows": fresh_rows,
          "rows_encoded_since_training": encoded_before + fresh_rows,
          "train_seconds": 0.0,
        }
      )
      # A knob out of range for the kept structure (a refresher's override) trains anew, where the build
      # refuses it by name if no new structure takes it either; the update would have published it.
      backend.check_update_values(options, config, index_k(source.report, len(state.ids)), len(state.ids))
      index = backend.update(trained, config, state.embeddings, source_rows, state.eligible, options)
    except (KeyError, ValueError) as e:
      reason = f"the index cannot be updated: {e}"
    else:
      index.config["build_seconds"] = round(time.perf_counter() - started, 3)
      return index
  logging.info("Training the index anew: %s", reason)
  k = index_k(source.report, len(state.ids))
  index = base.build_index(source.report.index, state.embeddings, k=k, eligible=state.eligible, **options)
  if backend.updatable:  # What the next refresh's policy counts from.
    index.config.update({"update": "full", "full_build_reason": reason, "rows_encoded_since_training": 0})
  return index
