"""Publishes version N+1 of a served model from version N and a catalog delta, without retraining.

Version N already holds everything a refresh needs: its towers (variables and traced functions), its
`encode_item` signature, its catalog state (`refresh_state`) and its warm-up records. A refresh

- embeds new and changed ads with N's own `encode_item` (`refresh_towers`), so their embeddings match
  the served towers bit for bit, and applies the delta to N's catalog (`refresh_apply`);
- rebuilds only the index, with N's backend, k and tuned search knobs, updated from N's training
  while it can be (`refresh_policy`);
- writes the new index's variables under N's own graph when that graph fits them
  (`refresh_checkpoint`), else traces the serving functions around N's restored towers; copies N's
  warm-up records, and publishes atomically (`refresh_publish`).

A status-only delta (pause/resume) does not load N at all: the new version is N's files, hard-linked,
with the variables checkpoint rewritten so that only the eligibility mask differs. Servers compare
nothing but the version number, so this is a full, independent version.

A delta that changes nothing (pausing ads already paused, removing ads already gone) publishes
nothing: a new version would cost every server a load and a warm-up for the same answers.

A channel graph (a version whose report lists "channels") is refreshed the same way in every
channel's index (`refresh_channels`).

This module orchestrates those steps for one model base path, and remembers what it loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging

from engine import base
from export import (
  refresh_apply,
  refresh_channels,
  refresh_delta,
  refresh_policy,
  refresh_publish,
  refresh_retrain,
  refresh_state,
  refresh_towers,
  version_report,
  versions,
)


class IndexOptionsError(ValueError):
  """An `--index_options` override the source version's index does not take."""


UNCHANGED = "unchanged"


def unchanged_report(
  source: refresh_state.Source | refresh_channels.ChannelSource, change: refresh_apply.StatusChange
) -> dict[str, Any]:
  """What `Refresher.apply` answers for a delta that changes nothing in `source` (`change.changed` False).

  Nothing changes when the delta adds and changes no ad, removes only ads already gone (a delta applied
  twice), and sets only statuses the ads already have.
  """
  return {
    "version": source.version,
    "path": source.path,
    "kind": UNCHANGED,
    "published": False,
    "delta": {
      "statuses_already_set": change.counts["status_changes"],
      "ignored_removals": change.counts["ignored_removals"],
    },
  }


class Refresher:
  """Turns catalog deltas into new versions of one model base path.

  The towers of the first version it refreshes are loaded once and reused for every later version
  (they are the same towers), and the catalog state of the version it last published stays in
  memory; both are read again only when someone else publishes a version in between (a rollback,
  a new fgr-export), or replaces a version under the same number (`refresh_state.version_identity`).

  Args:
    base_path: the model base path (BASE/<version>/).
    from_version: the version to start from; the newest when None.
    keep_versions: after each publish, keep only this many newest versions (None keeps all).
    defer_prune: delete the versions beyond `keep_versions`, and free the previous catalog, when the
      next publish starts rather than right after a publish, so that neither competes with servers
      restoring the new version (docs/history/benchmarks-2026-11.md, Freshness); up to `keep_versions` + 1 versions
      stay on disk in between. For a resident refresher (`--watch`).
    index_overrides: index options replacing the source version's in rebuilds.
    verify_recall: after each rebuild, measure recall@k on the warm-up queries (reported, not a gate).
    index_update: "auto" updates the index from the source's training while few rows changed since it
      was trained (backends that can), "full" always trains anew (see `refresh_policy.rebuild_index`).
    retrain_fraction: with "auto", the share of the catalog encoded since the last training beyond which
      the index is trained anew.
    background_retrain: with "auto", train anew in a background thread (`refresh_retrain`) and keep
      publishing incremental updates meanwhile, instead of training on the publish path. For a
      resident refresher (`--watch`); the next rebuild (or `publish_retrained`) takes the new training.
      Channel graphs do not retrain in the background (their rebuilds follow `index_update`).
  """

  def __init__(
    self,
    base_path: str,
    from_version: int | None = None,
    keep_versions: int | None = None,
    defer_prune: bool = False,
    index_overrides: dict[str, Any] | None = None,
    verify_recall: bool = True,
    index_update: str = "auto",
    retrain_fraction: float = refresh_policy.DEFAULT_RETRAIN_FRACTION,
    background_retrain: bool = False,
  ):
    if keep_versions is not None and keep_versions < 1:
      raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
    if index_update not in refresh_policy.INDEX_UPDATES:
      raise ValueError(f"index_update must be one of {refresh_policy.INDEX_UPDATES}, got {index_update!r}")
    if not 0 <= retrain_fraction <= 1:
      raise ValueError(f"retrain_fraction must be in [0, 1], got {retrain_fraction}")
    self.base_path = base_path
    self.keep_versions = keep_versions
    self.defer_prune = defer_prune
    self._retired_source: refresh_state.Source | None = None  # With defer_prune: the previous catalog, freed later.
    self.index_overrides = dict(index_overrides or {})
    self.verify_recall = verify_recall
    self.index_update = index_update
    self.retrain_fraction = retrain_fraction
    self.background_retrain = background_retrain
    self._retrain: refresh_retrain.BackgroundRetrain | None = None
    self._from_version = from_version
    self._version: int | None = None  # The number the refresh under way publishes as.
    self._source: refresh_state.Source | refresh_channels.ChannelSource | None = None
    self._source_identity: refresh_state.Identity | None = None
    self._towers: refresh_towers.LoadedTowers | refresh_channels.ChannelTowers | None = None
    # The version (number and identity) the loaded towers came from, or one this refresher published from it.
    self._towers_of: tuple[int, refresh_state.Identity] | None = None

  def source(self) -> refresh_state.Source | refresh_channels.ChannelSource:
    """The version the next refresh starts from (read again if another writer published since)."""
    on_disk = versions.list_versions(self.base_path)
    if not on_disk:
      raise FileNotFoundError(f"No version under {self.base_path} to refresh; run fgr-export first")
    wanted = self._from_version if self._from_version is not None else on_disk[-1]
    if wanted not in on_disk:
      raise FileNotFoundError(f"No version {wanted} under {self.base_path} (it has {on_disk}): check --from_version")
    identity = refresh_state.version_identity(os.path.join(self.base_path, str(wanted)))
    if self._source is None or self._source.version != wanted or self._source_identity != identity:
      if self._source is not None and self._source.version == wanted:
        logging.warning("Version %d under %s was replaced since it was read: reading it again", wanted, self.base_path)
        self._retrain = None  # Its rows were those of the version replaced.
      source = refresh_channels.read_source(self.base_path, wanted)
      self._check_overrides(source.report.index)
      self._source, self._source_identity = source, identity
    return self._source

  def check_index_overrides(self) -> None:
    """Raises IndexOptionsError if `index_overrides` holds an option the source version's index does not take.

    Reads only that version's report. Checked up front because every version a rebuild publishes
    keeps the overrides in its report: a typo would break each later rebuild, not this refresh.
    """
    on_disk = versions.list_versions(self.base_path)
    if on_disk:  # Without a version, `source` says so.
      wanted = self._from_version if self._from_version is not None else on_disk[-1]
      # A damaged report raises its own ValueError, which is no mistake in the options.
      index = version_report.read(os.path.join(self.base_path, str(wanted))).index
      try:
        self._check_overrides(index)
      except ValueError as e:
        raise IndexOptionsError(str(e)) from None

  def _check_overrides(self, index: str) -> None:
    # Incremental and status-only refreshes build nothing, so no build would catch a bad option.
    base.backend(index).check_options(self.index_overrides)

  def prepare(self) -> None:
    """Reads the source version's catalog and loads its towers now rather than at the first delta."""
    self._towers_for(self.source())

  def _towers_for(
    self, source: refresh_state.Source | refresh_channels.ChannelSource
  ) -> refresh_towers.LoadedTowers | refresh_channels.ChannelTowers:
    # Versions this refresher published share the towers it loaded; anything else is loaded anew.
    # (`source` is always `self._source`, read as `self._source_identity`.)
    key = (source.version, self._source_identity)
    if self._towers is None or self._towers_of != key:
      base.backend(source.report.index).load_ops()
      if isinstance(source, refresh_channels.ChannelSource):
        self._towers = refresh_channels.ChannelTowers.load(source.path, source.names)
      else:
        self._towers = refresh_towers.LoadedTowers.load(source.path)
      self._towers_of = key
    return self._towers

  def apply(self, delta: refresh_delta.CatalogDelta) -> dict[str, Any]:
    """Publishes the catalog after `delta` as a new version; returns its report (`VersionReport.to_json`).

    A delta that leaves the catalog as it is publishes nothing, and returns `unchanged_report`'s
    answer ("published": false, the source's version and path).

    Raises:
      FileExistsError: another writer (fgr-export, another refresher) published while this refresh
        ran; nothing was published, and a new attempt starts from the newest version.
    """
    self._prune_deferred()
    source = self.source()
    # Raises, as a publish would, for a status change of an ad the catalog lacks.
    change = refresh_apply.status_change(source.eligible, source.row_of, delta)
    if change is not None and not change.changed:
      unchanged = unchanged_report(source, change)
      logging.info("The delta changes nothing in version %d: no version published", source.version)
      return unchanged
    with self._publishing_after(source):
      return self._apply(source, delta, change)

  @contextlib.contextmanager
  def _publishing_after(self, source: refresh_state.Source | refresh_channels.ChannelSource) -> Iterator[None]:
    """Takes the version number this refresh publishes as when it reads its source.

    A version another writer publishes meanwhile takes that number first, and this refresh then fails
    rather than publish over it: the newest version would otherwise lose that writer's change (a pause
    undone, a new export replaced by the old towers).
    """
    self._version = versions.next_version(self.base_path)
    try:
      yield
    except FileExistsError as e:
      self._source = None  # Read anew next time: the newest version is no longer ours.
      raise FileExistsError(f"{e} (this refresh started from version {source.version})") from None
    finally:
      self._version = None

  def _apply(
    self,
    source: refresh_state.Source | refresh_channels.ChannelSource,
    delta: refresh_delta.CatalogDelta,
    change: refresh_apply.StatusChange | None,
  ) -> dict[str, Any]:
    """Publishes `delta` over `source`: only a new mask when `change` (its `status_change`) is not None."""
    if isinstance(source, refresh_channels.ChannelSource):
      return self._apply_channels(source, delta, change)
    retrain = self._retrain_for(source)
    started = time.perf_counter()
    if change is not None:
      report = refresh_publish.publish_status_only(self.base_path, source, change.eligible, self._version)
      report.delta = change.counts
      if retrain is not None:  # Same rows: the snapshot's map carries over.
        retrain.version = report.version
      state = dataclasses.replace(source.state, eligible=change.eligible)
      new_source = refresh_state.Source(report.version, report.path, report, state, source.row_of)
      return self._published(source, report, new_source, started)
    delta.check_against(source.row_of)  # Before loading anything: a bad delta costs no embedding.
    remaining = delta.catalog_size_after(source.row_of)
    if remaining < source.report.k:
      raise ValueError(
        f"after the delta version {source.version}'s catalog has {remaining} ads, fewer than the k = "
        f"{source.report.k} each request returns: nothing published"
      )
    timings: dict[str, float] = {}
    towers = self._towers_for(source)
    timings["load_towers"] = time.perf_counter() - started
    step = time.perf_counter()
    state, counts, source_rows = refresh_apply.apply_delta(source.state, source.row_of, delta, towers.embed_items)
    timings["embed"] = time.perf_counter() - step
    row_of = state.row_of()  # A Python object per ad: made before the publish, not while servers load it.
    report = self._publish_rebuild(source, towers, state, source_rows, retrain, timings)
    report.delta = counts
    return self._published(
      source, report, refresh_state.Source(report.version, report.path, report, state, row_of), started
    )

  def _apply_channels(
    self,
    source: refresh_channels.ChannelSource,
    delta: refresh_delta.CatalogDelta,
    change: refresh_apply.StatusChange | None,
  ) -> dict[str, Any]:
    """`apply` for a channel graph: every channel's index follows the delta (`refresh_channels`)."""
    self._retrain = None  # Background retrains train one index; a channel graph has several.
    started = time.perf_counter()
    if change is not None:
      report, new_source = refresh_channels.publish_status_change(self.base_path, source, change, self._version)
      return self._published(source, report, new_source, started)
    report, new_source = refresh_channels.refresh(
      self.base_path,
      source,
      delta,
      lambda: self._towers_for(source),
      self.index_overrides,
      self.verify_recall,
      self.index_update,
      self.retrain_fraction,
      self._version,
    )
    return self._published(source, report, new_source, started)

  def publish_retrained(self) -> dict[str, Any] | None:
    """Publishes a finished background retrain over the newest catalog, with no delta; None if none is ready."""
    source = self.source()
    if isinstance(source, refresh_channels.ChannelSource):
      return None
    retrain = self._retrain_for(source)
    if retrain is None or not retrain.done:
      return None
    self._prune_deferred()
    started = time.perf_counter()
    towers = self._towers_for(source)
    with self._publishing_after(source):
      report = self._publish_rebuild(source, towers, source.state, np.arange(len(source.state.ids)), retrain, {})
    report.delta = {}
    new_source = refresh_state.Source(report.version, report.path, report, source.state, source.row_of)
    return self._published(source, report, new_source, started)

  def wait_for_retrain(self, timeout: float | None = None) -> bool:
    """Blocks until the background retrain (if any) is done; True when none is running any more."""
    return self._retrain is None or self._retrain.wait(timeout)

  def _retrain_for(self, source: refresh_state.Source) -> refresh_retrain.BackgroundRetrain | None:
    """The background retrain, if its row map still describes `source` (a rollback or export drops it)."""
    if self._retrain is not None and self._retrain.version != source.version:
      logging.info("Dropping the background retrain: version %d was published by someone else", source.version)
      self._retrain = None
    return self._retrain

  def _publish_rebuild(
    self,
    source: refresh_state.Source,
    towers: refresh_towers.LoadedTowers,
    state: refresh_state.CatalogState,
    source_rows: np.ndarray,
    retrain: refresh_retrain.BackgroundRetrain | None,
    timings: dict[str, float],
  ) -> version_report.VersionReport:
    retrained, rows = None, None
    if retrain is not None:
      rows = retrain.rows_after(source_rows)
      if retrain.done:
        try:
          retrained = retrain.result(rows)
        except RuntimeError as e:
          logging.error("%s; updating version %d's index instead", e, source.version)
          self._retrain = retrain = None
    report = refresh_publish.publish_rebuilt(
      self.base_path,
      source,
      towers,
      state,
      timings,
      self.index_overrides,
      self.verify_recall,
      version=self._version,
      source_rows=source_rows,
      index_update=self.index_update,
      retrain_fraction=self.retrain_fraction,
      retrained=retrained,
      background=self.background_retrain,
    )
    if retrained is not None:
      self._retrain = None
    elif retrain is not None:
      retrain.advance(rows, report.version)
    config = report.index_config
    if (
      self.background_retrain
      and self._retrain is None
      and config.get("update") in ("incremental", "retrained")
      and config["rows_encoded_since_training"] > self.retrain_fraction * len(state.ids)
    ):
      self._retrain = refresh_retrain.BackgroundRetrain(
        report.index,
        state.embeddings,
        refresh_policy.index_k(report, len(state.ids)),
        report.index_options,
        report.version,
      )
      report.background_retrain_started = True
    return report

  def _published(
    self,
    source: refresh_state.Source | refresh_channels.ChannelSource,
    report: version_report.VersionReport,
    new_source: refresh_state.Source | refresh_channels.ChannelSource,
    started: float,
  ) -> dict[str, Any]:
    report.time("total", time.perf_counter() - started)
    # The new version is now the newest: remember its state and that it shares our towers.
    identity = refresh_state.version_identity(new_source.path)
    if self._towers_of == (source.version, self._source_identity):
      self._towers_of = (new_source.version, identity)
    self._source, self._source_identity = new_source, identity
    self._from_version = None
    if self.defer_prune:
      self._retired_source = source
    else:
      self.prune()
    logging.info("Published version %d (%s) to %s", report.version, report.kind, report.path)
    return report.to_json()

  def rollback(self, version: int) -> dict[str, Any]:
    """Republishes `version` as the newest; returns its report (`VersionReport.to_json`)."""
    self._prune_deferred()
    report = refresh_publish.rollback(self.base_path, version)
    if not self.defer_prune:
      self.prune()
    logging.info("Rolled back to version %d as version %d", version, report.version)
    return report.to_json()

  def prune(self) -> list[int]:
    """Deletes the versions beyond `keep_versions` now; returns them."""
    if self.keep_versions is None:
      return []
    return versions.prune(self.base_path, self.keep_versions)

  def _prune_deferred(self) -> None:
    if not self.defer_prune:
      return
    self._retired_source = None
    if removed := self.prune():
      logging.info("Deleted versions %s before publishing (keeping the %d newest)", removed, self.keep_versions)
