"""ScaNN across versions: the knobs a rebuild keeps, the options that force a retrain, and updates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engine import base, scann_config, scann_index, scann_update

# The roles of ScaNN's knobs (see `scann_config`).
TUNED_KNOBS = scann_config.names(scann_config.TUNED)
STRUCTURE_OPTIONS = scann_config.names(scann_config.STRUCTURE)
SEARCH_KNOBS = scann_config.names(scann_config.SEARCH)


def built_partitioning(config: Mapping[str, Any]) -> str:
  """The k-means a version's tree was built with (generic for versions from before the option)."""
  return config.get("partitioning", "generic")


def _differs(config: Mapping[str, Any], name: str, value: Any) -> bool:
  """Whether option `name` = `value` differs from the build `config` records."""
  if name == "partitioning":
    return value != "auto" and value != built_partitioning(config)  # "auto" keeps the version's.
  return value != config.get(name)


class ScannBackend(base.Backend):
  """ScaNN: updatable from an earlier build's trained partitioner and codebook (`engine.scann_update`)."""

  updatable = True

  def __init__(self):
    super().__init__("scann", scann_index.build_scann)

  def check_options(self, options: Mapping[str, Any]) -> None:
    scann_config.check_names(options)  # The check every build makes (`ScannConfig.for_catalog`).

  def check_values(self, options: Mapping[str, Any], k: int, num_items: int) -> None:
    scann_config.ScannConfig.for_catalog(num_items, k, **options)  # The checks of the build, without ScaNN.

  def check_update_values(self, options: Mapping[str, Any], config: Mapping[str, Any], k: int, num_items: int) -> None:
    # The structure is the trained one (an update keeps it), not what `for_catalog` would derive anew.
    kept = {name: config[name] for name in (*STRUCTURE_OPTIONS, "training_sample_size") if name in config}
    self.check_values({**kept, **options}, k, num_items)

  def load_ops(self) -> None:
    import scann  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  def rebuild_options(
    self,
    options: Mapping[str, Any],
    config: Mapping[str, Any],
    k: int,
    overrides: Mapping[str, Any] | None = None,
  ) -> dict[str, Any]:
    options, overrides = dict(options), dict(overrides or {})
    if self.structure_changes(config, overrides):
      # Search knobs picked for the version's structure say nothing about another (30 leaves to search of 30
      # are out of range for an override of 20 leaves), and a refreshed version's options hold its tuned
      # ones: tune them anew, unless the overrides set them too.
      options = {name: value for name, value in options.items() if name not in TUNED_KNOBS}
    else:
      for knob in TUNED_KNOBS:
        if knob in config and knob not in options:
          options[knob] = config[knob]
      if config.get("reorder", 0) > 0 and "final_candidates" not in options:
        # The version predates the knob: keep its graph, which returns every reordered candidate.
        options["final_candidates"] = scann_index.returned_candidates(config, k)
    if "partitioning" not in options:
      options["partitioning"] = built_partitioning(config)  # A retrain partitions as the version did.
    return {**options, **overrides}

  def structure_changes(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> list[str]:
    changed = [name for name in STRUCTURE_OPTIONS if name in options and _differs(config, name, options[name])]
    if "reorder" in options and (options["reorder"] > 0) != (config.get("reorder", 0) > 0):
      changed.append("reorder")  # Reordering on or off changes the assets; its size is a search knob.
    return changed

  def background_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
    return {"training_threads": 1, **options}

  def trained(self, index: base.Index) -> scann_update.ScannAssets:
    return scann_update.ScannAssets.from_state(index.state)

  def read_trained(self, checkpoint_prefix: str, index_path: str, embeddings: np.ndarray) -> scann_update.ScannAssets:
    return scann_update.ScannAssets.from_checkpoint(
      checkpoint_prefix, embeddings, scope=f"{index_path}/{scann_index.STATE}"
    )

  def update(
    self,
    trained: scann_update.ScannAssets,
    config: Mapping[str, Any],
    embeddings: np.ndarray,
    source_rows: np.ndarray,
    eligible: np.ndarray,
    options: Mapping[str, Any],
  ) -> scann_index.ScannIndex:
    assets = scann_update.update(trained, embeddings, source_rows)
    config = {**config, **{name: options[name] for name in SEARCH_KNOBS if name in options}}
    return scann_update.index_from_assets(assets, config, eligible)


BACKEND = ScannBackend()
