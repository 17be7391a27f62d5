"""fgr-refresh for a channel graph: one delta moves every channel's index, over one shared row order.

A channel graph (`engine.channels`) holds, per channel, towers, an index and the catalog's embeddings in
that channel's space; the ad ids and the eligibility mask are the catalog's, so they are the same in
every channel. A refresh of version N:

- for a status-only delta (pause/resume), writes the new mask into every channel's index in a copy of
  N's checkpoint and hard-links the rest, as `refresh_publish.publish_status_only` does for one index:
  paused ads stay masked in every channel, and nothing is loaded or embedded;
- otherwise embeds new and changed ads once with N's `encode_item` (one output per channel), applies
  the delta to each channel's catalog (`refresh_apply`), and rebuilds each channel's index with N's
  backend and options at that channel's depth (`refresh_policy.rebuild_index`). The new version keeps
  N's graph when every channel's index fits it (`refresh_checkpoint`), else traces a new `ChannelGraph`
  around N's restored towers with the calibrations and defaults of N's report.

Each channel's float embeddings live in `assets.extra/catalog_embeddings_<channel>.npy`
(`refresh_state.embeddings_path`), and the report carries over what fgr-eval reads of a channel graph.
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

from engine import base, channels, full_graph
from export import (
  channel_exporter,
  refresh_apply,
  refresh_checkpoint,
  refresh_delta,
  refresh_policy,
  refresh_publish,
  refresh_state,
  refresh_towers,
  verify,
  version_files,
  version_report,
  versions,
  warmup,
)

CHANNELS = channel_exporter.CHANNELS
CHANNEL_DEFAULTS = channel_exporter.CHANNEL_DEFAULTS
CALIBRATION = channel_exporter.CALIBRATION
# What a refreshed version's report carries over from its source (fgr-eval reads these).
CARRIED_EXTRAS = (CHANNELS, CALIBRATION, CHANNEL_DEFAULTS, channel_exporter.CALIBRATION_EXAMPLES)
WARMUP_RECALL = "channel_warmup_recall_vs_exact"


def index_path(channel: int) -> str:
  """The object path of channel `channel`'s index in a saved ChannelGraph."""
  return f"{channels.CHANNELS}/{channel}/{full_graph.INDEX}"


def embeddings_variable_path(channel: int) -> str:
  """The object path of channel `channel`'s catalog embeddings in a saved ChannelGraph."""
  return f"{channels.CHANNELS}/{channel}/{channels.EMBEDDINGS}"


def eligible_keys(version_path: str, num_channels: int) -> list[str]:
  """The checkpoint key of each channel's eligibility mask."""
  paths = [f"{index_path(i)}/{base.ELIGIBLE}" for i in range(num_channels)]
  keys = refresh_checkpoint.variable_keys(version_files.variables_prefix(version_path), paths)
  missing = [path for path in paths if path not in keys]
  if missing:
    raise ValueError(f"{version_path} is not a channel graph of {num_channels} channels: no variable at {missing}")
  return [keys[path] for path in paths]


@dataclasses.dataclass
class ChannelSource:
  """A channel graph version a refresh starts from: its report and each channel's catalog state.

  Attributes:
    version, path, report: the version.
    names: its channels, in graph order.
    states: each channel's catalog by name; ids and eligibility are the same arrays in every channel.
    row_of: the row of each ad id.
  """

  version: int
  path: str
  report: version_report.VersionReport
  names: list[str]
  states: dict[str, refresh_state.CatalogState]
  row_of: dict[str, int]

  @property
  def ids(self) -> np.ndarray:
    return self.states[self.names[0]].ids

  @property
  def eligible(self) -> np.ndarray:
    return self.states[self.names[0]].eligible

  @property
  def depths(self) -> list[int]:
    """Each channel's depth: its index's k, the most candidates a request may ask of it."""
    return [int(depth) for depth in self.report.extra[CHANNEL_DEFAULTS]["depths"]]

  def index_config(self, channel: int) -> dict[str, Any]:
    """The build config of a channel's index ({} when the report does not say)."""
    configs = self.report.extra.get(refresh_state.CHANNEL_INDEX_CONFIGS)
    if configs is not None:
      return dict(configs.get(self.names[channel], {}))
    # fgr-export's report before per-channel configs: the top-level config is the first channel's.
    return dict(self.report.index_config) if channel == 0 else {}

  def channel_view(self, channel: int) -> refresh_state.Source:
    """One channel as a single-index source (its index's backend, depth, options and config), for
    `refresh_policy`."""
    report = version_report.VersionReport(
      version=self.version,
      path=self.path,
      index=self.report.index,
      k=self.depths[channel],
      index_options=self.report.index_options,
      index_config=self.index_config(channel),
    )
    return refresh_state.Source(self.version, self.path, report, self.states[self.names[channel]], self.row_of)

  @classmethod
  def read(cls, base_path: str, version: int) -> ChannelSource:
    path = os.path.join(base_path, str(version))
    if version not in versions.list_versions(base_path):
      raise FileNotFoundError(f"No complete version {version} under {base_path}")
    report = version_report.read(path)
    names = list(report.extra[CHANNELS])
    for name in names:  # A refresh carries the calibrations over unchanged (refusing would block masking).
      for kind, fitted in report.extra[CALIBRATION][name].items():
        if not fitted["slope"] > 0:
          logging.warning(
            "%s: channel %s's %s calibration has slope %.4g, so the merge ranks its worst candidates first "
            "(exported before fgr-export refused such fits): export the channel run again",
            path,
            name,
            kind,
            fitted["slope"],
          )
    states = read_states(path, names)
    return cls(version, path, report, names, states, states[names[0]].row_of())


def shared_index_options(
  source_options: dict[str, Any], overrides: dict[str, Any] | None, rebuilt: dict[str, dict[str, Any]]
) -> dict[str, Any]:
  """The index options a rebuilt channel graph's report keeps: the source's with the overrides, less any a
  channel's rebuild dropped.

  Each channel's tuned knobs stay in its own config, so that the next refresh does not hand the first
  channel's to the others. A rebuild drops the search knobs a structure change made stale (`engine`'s
  `rebuild_options`, which then tunes anew); kept here, the next refresh would find them differing from
  what the channels were built with and train every channel again, back at the stale knobs.

  Args:
    source_options: the source version's report's options.
    overrides: the refresher's `--index_options`.
    rebuilt: each channel's options for this rebuild (`refresh_policy.rebuild_options`).
  """
  requested = {**source_options, **(overrides or {})}
  return {name: value for name, value in requested.items() if all(name in options for options in rebuilt.values())}


def read_states(version_path: str, names: list[str]) -> dict[str, refresh_state.CatalogState]:
  """Reads a channel graph's shared ids and eligibility from its checkpoint and each channel's embeddings."""
  ids, *masks = refresh_state.read_variables(
    version_path, [full_graph.ITEM_IDS_KEY, *eligible_keys(version_path, len(names))]
  )
  ids, masks = base.decoded_strings(ids), [mask.astype(bool) for mask in masks]
  if any(not np.array_equal(mask, masks[0]) for mask in masks[1:]):
    raise ValueError(f"{version_path}: the channels' eligibility masks differ; export the version again")
  states = {}
  for name in names:
    path = refresh_state.embeddings_path(version_path, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing: export the channel graph again to refresh it")
    embeddings = np.load(path, mmap_mode="r")
    if embeddings.shape[0] != len(ids) or masks[0].shape != ids.shape:
      raise ValueError(
        f"{version_path}: {len(ids)} ids, {masks[0].shape[0]} eligibility flags and "
        f"{embeddings.shape[0]} embeddings of channel {name} do not match"
      )
    states[name] = refresh_state.CatalogState(ids=ids, embeddings=embeddings, eligible=masks[0])
  return states


def read_source(base_path: str, version: int) -> refresh_state.Source | ChannelSource:
  """The version to refresh: a channel graph's sources, or a single index's."""
  path = os.path.join(base_path, str(version))
  if version in versions.list_versions(base_path) and channel_exporter.is_channel_version(version_report.read(path)):
    return ChannelSource.read(base_path, version)
  return refresh_state.Source.read(base_path, version)


@dataclasses.dataclass
class ChannelTowers:
  """A channel graph version's towers, restored once, each called through the version's encode signatures.

  The signatures return every channel's embedding in one call, so a retraced graph's tower of channel
  c calls them and keeps output `embeddings_<c>`.
  """

  names: list[str]
  query_towers: list[refresh_towers.RestoredTower]
  item_towers: list[refresh_towers.RestoredTower]
  query_specs: dict[str, tf.TensorSpec]
  item_specs: dict[str, tf.TensorSpec]
  encode_item: Callable[..., dict[str, tf.Tensor]]
  encode_query: Callable[..., dict[str, tf.Tensor]]

  @classmethod
  def load(cls, version_path: str, names: list[str]) -> ChannelTowers:
    loaded = tf.saved_model.load(version_path)
    encode_query = loaded.signatures[full_graph.ENCODE_QUERY]
    encode_item = loaded.signatures[full_graph.ENCODE_ITEM]
    query_towers, item_towers = [], []
    for i, name in enumerate(names):
      channel = loaded.channels[i]
      output = channels.embedding_output(name)
      query_towers.append(
        refresh_towers.RestoredTower.from_loaded(channel.query_tower, encode_query, f"query_tower_{name}", output)
      )
      item_towers.append(
        refresh_towers.RestoredTower.from_loaded(channel.item_tower, encode_item, f"item_tower_{name}", output)
      )
    return cls(
      names=list(names),
      query_towers=query_towers,
      item_towers=item_towers,
      query_specs=dict(encode_query.structured_input_signature[1]),
      item_specs=dict(encode_item.structured_input_signature[1]),
      encode_item=encode_item,
      encode_query=encode_query,
    )

  def embed_items(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 [B, d_c] embeddings of raw item features in each channel c, in batches."""
    count = len(features[next(iter(features))])
    parts: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
    for start in range(0, count, refresh_towers.EMBED_BATCH_SIZE):
      batch = {
        name: tf.constant(values[start : start + refresh_towers.EMBED_BATCH_SIZE]) for name, values in features.items()
      }
      outputs = self.encode_item(**batch)
      for name in self.names:
        parts[name].append(outputs[channels.embedding_output(name)].numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()} if count else {}

  def embed_queries(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 [B, d_c] query embeddings in each channel c."""
    outputs = self.encode_query(**{name: tf.constant(values) for name, values in features.items()})
    return {name: outputs[channels.embedding_output(name)].numpy() for name in self.names}


def apply_delta(
  source: ChannelSource, delta: refresh_delta.CatalogDelta, towers: ChannelTowers
) -> tuple[dict[str, refresh_state.CatalogState], dict[str, int], np.ndarray]:
  """Every channel's catalog after `delta`; the counts and source rows (`refresh_apply.apply_delta`)."""
  upsert_ids, features = delta.item_features()
  embedded = towers.embed_items(features) if upsert_ids else {}
  states, counts, source_rows = {}, {}, None
  for name in source.names:
    state = source.states[name]
    dim = state.embeddings.shape[1]
    new_state, counts, rows = refresh_apply.apply_delta(
      state, source.row_of, delta, lambda _, name=name, dim=dim: embedded.get(name, np.zeros([0, dim], np.float32))
    )
    if source_rows is not None:  # The same delta on the same rows: one row order in every channel.
      first = states[source.names[0]]
      if not np.array_equal(rows, source_rows) or not np.array_equal(new_state.ids, first.ids):
        raise RuntimeError(f"channel {name}'s catalog rows diverged from channel {source.names[0]}'s")
      new_state = dataclasses.replace(new_state, ids=first.ids, eligible=first.eligible)
    states[name], source_rows = new_state, rows
  return states, counts, source_rows


def check_depths(source: ChannelSource, num_items: int) -> None:
  """Raises ValueError when the catalog is smaller than some channel's depth (its index's k)."""
  for name, depth in zip(source.names, source.depths):
    if num_items < depth:
      raise ValueError(
        f"after the delta version {source.version}'s catalog has {num_items} ads, fewer than channel "
        f"{name}'s depth {depth}: nothing published"
      )


def _report(
  source: ChannelSource, version: int, base_path: str, kind: str, ids: np.ndarray, eligible: np.ndarray
) -> version_report.VersionReport:
  """The report of a version refreshed from `source`: its indexes as the source's, over the new catalog."""
  extra = {key: source.report.extra[key] for key in CARRIED_EXTRAS if key in source.report.extra}
  extra[refresh_state.CHANNEL_INDEX_CONFIGS] = {name: source.index_config(i) for i, name in enumerate(source.names)}
  return refresh_publish.refreshed_report(source.report, source.version, version, base_path, kind, ids, eligible, extra)


def publish_status_only(
  base_path: str, source: ChannelSource, eligible: np.ndarray, version: int | None = None
) -> version_report.VersionReport:
  """Publishes N's graph and indexes with a new eligibility mask in every channel: no load, no build."""
  base.backend(source.report.index).load_ops()
  keys = eligible_keys(source.path, len(source.names))
  return refresh_publish.publish_checkpoint_change(
    base_path,
    source.path,
    {key: eligible for key in keys},
    lambda number: _report(source, number, base_path, "status_only", source.ids, eligible),
    version,
  )


def graph_replacements(
  source: ChannelSource, indexes: list[base.Index], states: dict[str, refresh_state.CatalogState]
) -> tuple[dict[str, Any] | None, str | None]:
  """The checkpoint tensors under which N's channel graph serves `indexes` over `states`, or (None, why not).

  As `refresh_checkpoint.graph_replacements` for one index: every channel's index must say N's graph
  fits it, and N must have saved the catalog variables (ids, every index's catalog-sized state, every
  channel's embeddings) with shapes the new values fit.
  """
  ids = states[source.names[0]].ids
  values: dict[str, Any] = {full_graph.ITEM_IDS: base.string_array(ids)}
  optional: set[str] = set()
  prefixes = [f"{full_graph.ITEM_IDS}/"]
  for i, (name, index) in enumerate(zip(source.names, indexes)):
    reason = index.graph_reuse_blocker(source.index_config(i), source.depths[i], len(source.ids))
    if reason is not None:
      return None, f"channel {name}: {reason}"
    values.update({f"{index_path(i)}/{path}": value for path, value in index.checkpoint_values().items()})
    optional |= {f"{index_path(i)}/{path}" for path in index.optional_checkpoint_paths()}
    values[embeddings_variable_path(i)] = np.asarray(states[name].embeddings, dtype=np.float32)
    prefixes += [f"{index_path(i)}/", f"{embeddings_variable_path(i)}/"]
  return refresh_checkpoint.checkpoint_replacements(source.path, source.version, values, optional, tuple(prefixes))


def _calibration(values: dict[str, float] | None) -> channels.Calibration | None:
  return None if values is None else channels.Calibration(float(values["slope"]), float(values["intercept"]))


def traced_graph(
  source: ChannelSource,
  towers: ChannelTowers,
  indexes: list[base.Index],
  states: dict[str, refresh_state.CatalogState],
) -> channels.ChannelGraph:
  """A new ChannelGraph over N's restored towers, `indexes` and N's calibrations and defaults."""
  calibration = source.report.extra[CALIBRATION]
  built = [
    channels.Channel(
      name,
      towers.query_towers[i],
      towers.item_towers[i],
      indexes[i],
      states[name].embeddings,
      source.depths[i],
      click=_calibration(calibration[name]["click"]),
      relevance=_calibration(calibration[name].get("relevance")),
    )
    for i, name in enumerate(source.names)
  ]
  defaults = dict(source.report.extra[CHANNEL_DEFAULTS])
  defaults["weights"], defaults["depths"] = tuple(defaults["weights"]), tuple(defaults["depths"])
  return channels.ChannelGraph(
    built,
    states[source.names[0]].ids,
    source.report.k,
    channels.Defaults(**defaults),
    towers.query_specs,
    towers.item_specs,
    exclusions=source.report.exclusions,
  )


def warmup_recall(
  version_path: str,
  towers: ChannelTowers,
  indexes: list[base.Index],
  states: dict[str, refresh_state.CatalogState],
  depths: list[int],
) -> dict[str, float] | None:
  """Each channel's recall@depth against exact search for the queries of a version's warm-up records."""
  queries = warmup.read_warmup_queries(version_path)
  if not queries:
    return None
  embedded = [towers.embed_queries(query) for query in queries]
  recall = {}
  for name, index, depth in zip(towers.names, indexes, depths):
    state = states[name]
    if state.eligible.sum() >= depth:
      query_embeddings = np.concatenate([e[name] for e in embedded])
      recall[name] = round(verify.index_recall(index, query_embeddings, state.embeddings, state.eligible, depth), 4)
  return recall


def publish_rebuilt(
  base_path: str,
  source: ChannelSource,
  towers: ChannelTowers,
  states: dict[str, refresh_state.CatalogState],
  source_rows: np.ndarray,
  timings: dict[str, float],
  index_overrides: dict[str, Any] | None = None,
  verify_recall: bool = True,
  version: int | None = None,
  index_update: str = "auto",
  retrain_fraction: float = refresh_policy.DEFAULT_RETRAIN_FRACTION,
) -> version_report.VersionReport:
  """Rebuilds every channel's index over its new catalog and publishes them with N's towers.

  Args:
    base_path: the model base path.
    source: version N.
    towers: N's restored towers.
    states: each channel's catalog in the new version (one row order).
    source_rows: int64 [N'], the row of N each new row copies unchanged (-1: new or changed).
    timings: seconds spent so far, by step; the build and write steps are added.
    index_overrides: index options replacing N's, in every channel.
    verify_recall: after publishing, measure each channel's recall@depth on N's warm-up queries.
    version: explicit version number; the next free one when None.
    index_update, retrain_fraction: see `refresh_policy.rebuild_index`.
  """
  ids = states[source.names[0]].ids
  check_depths(source, len(ids))
  started = time.perf_counter()
  indexes, options = [], {}
  for i, name in enumerate(source.names):
    view = source.channel_view(i)
    options[name] = refresh_policy.rebuild_options(view.report, index_overrides)
    indexes.append(
      refresh_policy.rebuild_index(
        view, states[name], source_rows, options[name], index_update, retrain_fraction, index_path=index_path(i)
      )
    )
  timings["build"] = time.perf_counter() - started

  replacements, retrace_reason = graph_replacements(source, indexes, states)
  embeddings_files = tuple(
    os.path.relpath(refresh_state.embeddings_path(source.path, name), source.path) for name in source.names
  )
  started = time.perf_counter()
  with versions.publish(base_path, version) as (temp_path, version):
    refresh_publish.write_graph(
      source.path,
      temp_path,
      replacements,
      retrace_reason,
      lambda path: traced_graph(source, towers, indexes, states).save(path),
      skip=embeddings_files,
    )
    for name in source.names:
      refresh_state.write_embeddings(temp_path, states[name].embeddings, channel=name)
    report = _report(source, version, base_path, "rebuild", ids, states[source.names[0]].eligible)
    report.graph = f"version {source.version}'s" if replacements is not None else "traced"
    report.graph_traced_because = retrace_reason
    report.index_options = shared_index_options(source.report.index_options, index_overrides, options)
    report.index_config = dict(indexes[0].config) or report.index_config
    report.extra[refresh_state.CHANNEL_INDEX_CONFIGS] = {
      name: dict(index.config) or source.index_config(i) for i, (name, index) in enumerate(zip(source.names, indexes))
    }
    report.index_update = report.index_config.get("update", "full")
    report.index_bytes = int(sum(index.nbytes() for index in indexes))
    version_report.write(temp_path, report)
  timings["write"] = time.perf_counter() - started
  report.published_at = time.time()
  if verify_recall:  # After the publish: a report, not a delay on the way to serving.
    started = time.perf_counter()
    recall = warmup_recall(source.path, towers, indexes, states, source.depths)
    if recall is not None:
      report.extra[WARMUP_RECALL] = recall
    timings["verify"] = time.perf_counter() - started
  for step, seconds in timings.items():
    report.time(step, seconds)
  return report


def publish_status_change(
  base_path: str, source: ChannelSource, change: refresh_apply.StatusChange, version: int | None = None
) -> tuple[version_report.VersionReport, ChannelSource]:
  """Publishes version N's channel graph with the mask of `change`; returns its report and state as a source."""
  report = publish_status_only(base_path, source, change.eligible, version)
  report.delta = change.counts
  states = {name: dataclasses.replace(state, eligible=change.eligible) for name, state in source.states.items()}
  return report, ChannelSource(report.version, report.path, report, source.names, states, source.row_of)


def refresh(
  base_path: str,
  source: ChannelSource,
  delta: refresh_delta.CatalogDelta,
  towers: Callable[[], ChannelTowers],
  index_overrides: dict[str, Any] | None = None,
  verify_recall: bool = True,
  index_update: str = "auto",
  retrain_fraction: float = refresh_policy.DEFAULT_RETRAIN_FRACTION,
  version: int | None = None,
) -> tuple[version_report.VersionReport, ChannelSource]:
  """Publishes version N's channel graph after `delta`, which adds, changes or removes ads.

  A delta that only sets statuses is `publish_status_change`'s (`refresh_apply.status_change` tells).

  Args:
    base_path: the model base path.
    source: version N.
    delta: the catalog delta.
    towers: returns N's restored towers (called only when ads must be embedded or a graph traced).
    index_overrides, verify_recall, index_update, retrain_fraction: see `publish_rebuilt`.
    version: the number to publish as (the next free one when None).

  Returns:
    The new version's report and its state as a source.
  """
  # Checked before loading anything: a bad delta costs no embedding and publishes nothing.
  delta.check_against(source.row_of)
  check_depths(source, delta.catalog_size_after(source.row_of))
  timings: dict[str, float] = {}
  started = time.perf_counter()
  loaded = towers()
  timings["load_towers"] = time.perf_counter() - started
  started = time.perf_counter()
  states, counts, source_rows = apply_delta(source, delta, loaded)
  timings["embed"] = time.perf_counter() - started
  row_of = states[source.names[0]].row_of()
  report = publish_rebuilt(
    base_path,
    source,
    loaded,
    states,
    source_rows,
    timings,
    index_overrides,
    verify_recall,
    version,
    index_update=index_update,
    retrain_fraction=retrain_fraction,
  )
  report.delta = counts
  return report, ChannelSource(report.version, report.path, report, source.names, states, row_of)
