"""ScaNN's build knobs: each named once, with its default derived from the catalog and its role."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from engine import base

# ScaNN's rules of thumb: exact scoring is cheapest for small catalogs, AH + rescoring for medium
# ones, and partitioning (about sqrt(N) leaves) on top of that above ~100k points.
BRUTE_FORCE_MAX_ITEMS = 20_000
NO_TREE_MAX_ITEMS = 100_000
# The smallest AH training sample that reliably holds the 16 centres ScaNN trains per block (its sample
# is random in size: 18 asked for gave 15 at 50k ads), unless it is the whole catalog.
AH_MIN_TRAINING_SAMPLE = 64

# Roles of a knob across versions (`engine.scann_backend`): a STRUCTURE knob changes what a build
# trains or stores (changing it needs a full build); a SEARCH knob is read at search time (an update
# from a trained index takes it as it is); a TUNED knob is picked by the build for a target recall
# (a rebuild keeps the value rather than tuning again).
STRUCTURE, SEARCH, TUNED = "structure", "search", "tuned"


def _knob(default: Any, *roles: str) -> Any:
  return dataclasses.field(default=default, metadata={"roles": frozenset(roles)})


def default_reorder(scoring: str, num_items: int, k: int) -> int:
  """Pre-reorder candidates rescored exactly: none for exact scoring, 4k (at least 200) after AH."""
  return 0 if scoring == "brute_force" else min(num_items, max(4 * k, 200))


@dataclasses.dataclass
class ScannConfig:
  """How to build a ScaNN searcher; `for_catalog` derives the defaults from the catalog.

  Attributes:
    scoring: "brute_force" (exact) or "ah" (anisotropic hashing).
    num_leaves: tree leaves (0: no tree).
    leaves_to_search: leaves searched per query (0: tuned at build time for `target_recall`).
    training_sample_size: points the tree and the codebook train on (by default up to 250k: better recall
      at the same search knobs for a little more training; docs/history/benchmarks-2026-11.md, Index backends).
    partitioning: "auto" (spherical k-means when every embedding has unit norm, as ScaNN's authors
      configure dot product over normalised data, generic otherwise), "spherical" or "generic".
      Spherical leaves reach the target recall searching fewer of them (docs/history/benchmarks-2026-11.md, Index backends).
    dimensions_per_block: AH block size.
    anisotropic_quantization_threshold: AH's threshold.
    reorder: candidates rescored exactly (0: no reordering).
    final_candidates: reordered candidates returned before the eligibility filter (0: min(reorder, 2k)).
      Each costs a mask lookup and a top-k slot, so fewer than all reordered ones search faster.
    overfetch: multiple of k fetched without reordering.
    target_recall: the recall@k tuning aims for.
    num_tuning_queries: queries tuning measures recall on (catalog points without held-out queries).
    training_threads: ScaNN's training threads (0: all cores).
    seed: the seed of the tuning sample.
  """

  scoring: str = _knob("brute_force", STRUCTURE)
  num_leaves: int = _knob(0, STRUCTURE)
  leaves_to_search: int = _knob(0, SEARCH, TUNED)
  training_sample_size: int = _knob(250_000)
  partitioning: str = _knob("auto", STRUCTURE)
  dimensions_per_block: int = _knob(2, STRUCTURE)
  anisotropic_quantization_threshold: float = _knob(0.2, STRUCTURE)
  reorder: int = _knob(0, SEARCH, TUNED)
  final_candidates: int = _knob(0, SEARCH, TUNED)
  overfetch: int = _knob(2, SEARCH)
  target_recall: float = _knob(0.95)
  num_tuning_queries: int = _knob(200)
  training_threads: int = _knob(0)
  seed: int = _knob(0)

  @classmethod
  def for_catalog(cls, num_items: int, k: int, **options: Any) -> ScannConfig:
    """ScaNN's rules of thumb for `num_items` points searched for `k` neighbours, overridden by `options`."""
    check_names(options)
    if num_items < BRUTE_FORCE_MAX_ITEMS:
      scoring, num_leaves = "brute_force", 0
    elif num_items < NO_TREE_MAX_ITEMS:
      scoring, num_leaves = "ah", 0
    else:
      scoring, num_leaves = "ah", max(2, int(round(math.sqrt(num_items))))
    config = cls(scoring=scoring, num_leaves=num_leaves, training_sample_size=min(num_items, 250_000))
    config = dataclasses.replace(config, **options)
    if "reorder" not in options:
      # Derived from the scoring actually used: `scoring="ah"` on a catalog small enough for exact scoring
      # (e.g. a tree forced on a test catalog) would otherwise get AH without the exact reordering.
      config.reorder = default_reorder(config.scoring, num_items, k)
    config.check(k, num_items)
    return config

  def check(self, k: int, num_items: int) -> None:
    """Raises ValueError naming the first knob whose value no build over `num_items` points accepts.

    Checked before ScaNN trains, so a bad value is never a ScaNN traceback, a ZeroDivisionError, or an
    index whose every search fails.
    """
    if self.scoring not in ("brute_force", "ah"):
      raise ValueError(f"scoring must be 'brute_force' or 'ah', got {self.scoring!r}")
    if self.partitioning not in ("auto", "spherical", "generic"):
      raise ValueError(f"partitioning must be 'auto', 'spherical' or 'generic', got {self.partitioning!r}")
    base.check_option(
      "num_leaves", self.num_leaves, 0, num_items, valid=f"0 (no tree) or 1 to {num_items}, the number of ads"
    )
    # -1 is what a build without a tree records (and a rebuild passes back): tuned, like 0.
    if self.num_leaves:
      base.check_option(
        "leaves_to_search",
        self.leaves_to_search,
        -1,
        self.num_leaves,
        valid=f"0 (tuned for target_recall) or 1 to num_leaves ({self.num_leaves})",
      )
    else:
      base.check_option("leaves_to_search", self.leaves_to_search, -1, 0, valid="0 without a tree (num_leaves=0)")
    # A tree's k-means takes its leaves' centres from exactly `training_sample_size` ads. AH trains 16 centres
    # per block on a random sample of about that many (all the ads when it is at least their number),
    # which can fall short of 16 well above 16: from 64 on it does not.
    needed, reason = max(1, self.num_leaves), f"the tree picks its {self.num_leaves} leaves' centres from it"
    if self.scoring == "ah" and min(num_items, AH_MIN_TRAINING_SAMPLE) > needed:
      needed, reason = min(num_items, AH_MIN_TRAINING_SAMPLE), "AH trains 16 centres per block on it"
    base.check_option(
      "training_sample_size",
      self.training_sample_size,
      needed,
      valid=f"an integer of at least {needed}" + (f" ({reason})" if needed > 1 else ""),
    )
    base.check_option("dimensions_per_block", self.dimensions_per_block, 1)
    # NaN is ScaNN's own default: plain (isotropic) quantisation.
    threshold = self.anisotropic_quantization_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isinf(threshold):
      raise ValueError(f"anisotropic_quantization_threshold must be a finite number or NaN, got {threshold!r}")
    base.check_option("reorder", self.reorder, 0, valid=f"0 (no reordering) or at least k ({k})")
    if 0 < self.reorder < k:
      raise ValueError(f"reorder must be 0 (no reordering) or at least k ({k}), got {self.reorder}")
    base.check_option("final_candidates", self.final_candidates, 0, valid=f"0 (automatic) or at least k ({k})")
    if 0 < self.final_candidates < k:
      raise ValueError(f"final_candidates must be 0 (automatic) or at least k ({k}), got {self.final_candidates}")
    base.check_option("overfetch", self.overfetch, 1)
    base.check_option("target_recall", self.target_recall, 0, 1, integer=False)
    base.check_option("num_tuning_queries", self.num_tuning_queries, 1)
    base.check_option("training_threads", self.training_threads, 0, valid="0 (all cores) or positive")
    base.check_option("seed", self.seed, 0)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def check_names(options: Mapping[str, Any]) -> None:
  """Raises ValueError naming the options that are no `ScannConfig` knob (e.g. a typo)."""
  unknown = set(options) - set(names())
  if unknown:
    raise ValueError(f"Unknown ScaNN options {sorted(unknown)}; known: {sorted(names())}")


def names(role: str | None = None) -> tuple[str, ...]:
  """The knobs (with `role`, or all), in declaration order."""
  return tuple(
    field.name for field in dataclasses.fields(ScannConfig) if role is None or role in field.metadata["roles"]
  )
