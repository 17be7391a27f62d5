"""Judges a published version through its own signatures, so the figures are what a client of it gets.

A full graph: its `serving_default` answers on the test split (index approximation and exclusions
included), beside the popularity and item co-occurrence baselines ranked the same way.

A channel graph: every variant is one `search_with_options` knob setting of the same SavedModel: a
channel alone (its weight 1, the others' depth 0), the merged default, and the merged list re-ranked
by SSD and by DPP. The test examples the export calibrated on (the first `calibration_examples`) are
skipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from engine import base, channels, full_graph
from export import channel_exporter, refresh_channels, version_report
from models import evaluation, metrics
from models.data import schema, sequences, sources


def variants(report: version_report.VersionReport) -> dict[str, dict[str, Any]]:
  """The knob settings to judge, by name: each channel alone, "merged", "merged_ssd", "merged_dpp"."""
  names = report.extra[channel_exporter.CHANNELS]
  defaults = report.extra[channel_exporter.CHANNEL_DEFAULTS]
  out: dict[str, dict[str, Any]] = {}
  for c, name in enumerate(names):
    out[name] = {
      **defaults,
      "weights": [1.0 if i == c else 0.0 for i in range(len(names))],
      "depths": [d if i == c else 0 for i, d in enumerate(defaults["depths"])],
      "min_relevance": 0.0,
      "diversity": "none",
    }
  out["merged"] = {**defaults, "diversity": "none"}
  for method in ("ssd", "dpp"):
    out[f"merged_{method}"] = {**defaults, "diversity": method}
  return out


def _test_examples(source: sources.Source, skip: int, max_examples: int, batch_size: int) -> Iterator[dict]:
  """The test split after its first `skip` examples, at most `max_examples` (0: all), in batches."""
  seen = taken = 0
  for batch in source.examples("test"):
    n = len(batch[schema.AD_ID])
    start = max(0, skip - seen)
    seen += n
    for lo in range(start, n, batch_size):
      hi = min(n, lo + batch_size)
      if max_examples:
        hi = min(hi, lo + max_examples - taken)
      if hi <= lo:
        return
      taken += hi - lo
      yield {name: values[lo:hi] for name, values in batch.items()}


def _uncalibrated_examples(
  source: sources.Source, calibrated: int, max_examples: int, batch_size: int
) -> list[dict[str, np.ndarray]]:
  """The batches of test examples after the `calibrated` ones a channel export fit its calibrations on."""
  examples = list(_test_examples(source, calibrated, max_examples, batch_size))
  if not examples:
    num_test = sum(len(batch[schema.AD_ID]) for batch in source.examples("test"))
    raise ValueError(
      f"no test examples are left to evaluate: the test split has {num_test} and the export calibrated on the first "
      f"{calibrated}; export again with a lower fgr-export --calibration_examples"
    )
  return examples


def _load(version_path: str) -> Any:
  """The version's SavedModel; one line naming the version when it does not load (a version copied in
  part, or damaged on disk: TensorFlow's parse error came as a traceback, its missing-variables error
  with advice about devices)."""
  try:
    return tf.saved_model.load(version_path)
  except (OSError, ValueError, tf.errors.OpError, RuntimeError, IndexError) as e:  # IndexError: a truncated file.
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"{version_path} does not load as a SavedModel, damaged or incomplete: {reason}") from e


def _query(batch: dict[str, np.ndarray]) -> dict[str, tf.Tensor]:
  return {n: tf.constant(batch[n]) for n in schema.QUERY_FEATURE_NAMES}


def _row(ad_id: str, source: sources.Source) -> int:
  """The data's catalog row of `ad_id`; -1 (padding to the metrics) for "" and for an ad the data does
  not know: one fgr-refresh added to the version, which no test example clicked."""
  try:
    return source.row_of(ad_id) if ad_id else -1
  except KeyError:
    return -1


def _rows(ids: tf.Tensor, source: sources.Source) -> np.ndarray:
  """Catalog rows [n, k] of served ids (`_row`: -1 for "" past the answers and for ads the data lacks)."""
  return np.asarray([[_row(i, source) for i in answers] for answers in base.decoded_strings(ids)], np.int64)


def _embeddings_by_source_row(version_path: str, names: list[str], channel: str, source: sources.Source) -> np.ndarray:
  """Channel `channel`'s embeddings of the version's ads, at the data's catalog rows (what `_rows` returns).

  A refreshed version keeps its own row order (a removal shifts every later row, an added ad comes
  last), so its embeddings are matched to the data's rows by ad id; read by row, ILAD was measured on
  other ads' embeddings. Rows of ads the version lacks stay zero: it never serves them.
  """
  state = refresh_channels.read_states(version_path, names)[channel]
  # An ad fgr-refresh added has no row (-1): `_rows` gives it none either, so no metric reads its embedding.
  rows = np.asarray([_row(ad_id, source) for ad_id in state.ids], np.int64)
  num_rows = source.num_items
  if len(rows) == num_rows and np.array_equal(rows, np.arange(num_rows)):
    return state.embeddings  # The export's own row order: the memory-mapped file as is.
  known = rows >= 0
  aligned = np.zeros([num_rows, state.embeddings.shape[1]], np.float32)
  aligned[rows[known]] = state.embeddings[np.flatnonzero(known)]
  return aligned


def evaluate_full_graph(
  version_path: str,
  source: sources.Source,
  max_examples: int = 0,
  batch_size: int = 256,
  with_baselines: bool = True,
  ks: tuple[int, ...] | None = None,
) -> dict[str, Any]:
  """Ranking and water-level metrics of a full graph's `serving_default` answers on the test split.

  A test example's rank is its clicked item's place in the served list (k or more when absent), so
  recall and NDCG are at cut-offs up to the version's k: `ks` (default 10, 50, 100 below k, and k).
  The baselines rank the whole catalog on the same examples, without the request's history when the
  version excludes it.
  """
  report = version_report.read(version_path)
  if ks is not None and max(ks) > report.k:
    raise ValueError(
      f"{version_path} serves {report.k} candidates per request: it can't be judged at K={max(ks)} (--ks)"
    )
  base.backend(report.index).load_ops()
  serve = _load(version_path).signatures[full_graph.SERVING_DEFAULT]
  examples = list(_test_examples(source, 0, max_examples, batch_size))
  if not examples:
    raise evaluation.no_test_examples(source)
  recalled = np.concatenate([_rows(serve(**_query(batch))["ids"], source) for batch in examples])
  fields = {name: np.concatenate([b[name] for b in examples]) for name in examples[0]}
  positives = np.asarray([source.row_of(str(a)) for a in fields[schema.AD_ID]], dtype=np.int64)
  found = recalled == positives[:, np.newaxis]
  served = {"rank": np.where(found.any(axis=1), found.argmax(axis=1), report.k), "recalled": recalled}
  served.update(positive=positives, **{n: fields[n] for n in (schema.CONVERTED,) if n in fields})
  if ks is None:
    ks = tuple(k for k in (10, 50, 100) if k < report.k) + (report.k,)
  categories = sequences.catalog_column(source, schema.CATEGORY)
  out: dict[str, Any] = {
    "num_examples": int(len(positives)),
    "k": report.k,
    "exclusions": report.exclusions,
    **evaluation.summarise(served, ks, categories),
  }
  if with_baselines:
    exclude_history = report.exclusions == schema.HIST_IDS
    out["baselines"] = evaluation.judge_baselines(source, lambda: examples, ks, categories, None, exclude_history)
  return out


def evaluate_version(
  version_path: str,
  source: sources.Source,
  max_examples: int = 0,
  batch_size: int = 256,
  settings: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
  """Water-level, revenue and diversity metrics of each knob setting (`variants`) of a channel graph.

  Diversity (ILAD) is measured on the item embeddings of the channel the graph re-ranks with (the
  relevance channel), the same space SSD and DPP work in.
  """
  report = version_report.read(version_path)
  if not channel_exporter.is_channel_version(report):
    raise ValueError(f"{version_path} is not a channel graph (fgr-export of a `fgr-train --channels` run)")
  base.backend(report.index).load_ops()
  search = _load(version_path).signatures[full_graph.SEARCH_WITH_OPTIONS]
  names = report.extra[channel_exporter.CHANNELS]
  judge = next((n for n in names if "relevance" in report.extra[channel_exporter.CALIBRATION][n]), names[0])
  embeddings = _embeddings_by_source_row(version_path, names, judge, source)
  categories = sequences.catalog_column(source, schema.CATEGORY)
  has_bids = sources.bids_of(source, np.arange(1)) is not None
  settings = settings or variants(report)
  examples = _uncalibrated_examples(
    source, report.extra[channel_exporter.CALIBRATION_EXAMPLES], max_examples, batch_size
  )
  fields = {name: np.concatenate([b[name] for b in examples]) for name in examples[0]}
  positives = np.asarray([source.row_of(str(a)) for a in fields[schema.AD_ID]], dtype=np.int64)
  out: dict[str, Any] = {"num_examples": int(len(positives)), "k": report.k, "judged_in": judge, "variants": {}}
  for name, knobs in settings.items():
    options = channels.option_inputs(knobs)
    recalled, seconds = [], 0.0
    for batch in examples:
      started = time.perf_counter()
      result = search(**_query(batch), **options)
      seconds += time.perf_counter() - started
      recalled.append(_rows(result["ids"], source))
    recalled = np.concatenate(recalled)
    out["variants"][name] = {
      "knobs": knobs,
      **metrics.water_level_metrics(
        recalled,
        positives,
        fields.get(schema.CONVERTED),
        categories,
        None,
        query_categories=fields.get(schema.QUERY_CATEGORY),
        bids=fields.get(schema.BID) if has_bids else None,
        item_embeddings=embeddings,
        diversity_ks=(10, 50),
      ),
      "seconds_per_batch": round(seconds / len(examples), 5),
    }
  return out
