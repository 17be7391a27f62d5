"""Builds and publishes one SavedModel from a `fgr-train --channels` run: an index per channel, merged in the graph.

Each channel's towers are restored, the shared catalog is embedded and indexed once per channel, and
each channel's score is calibrated into probabilities (`engine.channels`) on the candidates the merge
ranks for held-out examples (`_calibrate`). The calibration examples are the test split's first
`calibration_examples`; fgr-eval skips them when it judges the export, so no example both fits and
judges the calibration.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from engine import base, channels, knob_rules, stock_ops
from export import exporter, refresh_state, verify, version_report, versions, warmup
from models import catalog as catalog_lib
from models import channels as channels_lib
from models import precision as precision_lib
from models import train
from models.data import queries as queries_lib
from models.data import schema, sequences, sources

# Keys of a channel graph's report (`VersionReport.extra`): fgr-refresh and fgr-eval read them.
CHANNELS = "channels"  # The channels' names, in graph order.
CALIBRATION = "calibration"
CALIBRATION_EXAMPLES = "calibration_examples"
CHANNEL_DEFAULTS = "channel_defaults"


def is_channel_version(report: version_report.VersionReport) -> bool:
  """Whether a version's report describes a channel graph."""
  return CHANNELS in report.extra


@dataclasses.dataclass
class ChannelOptions:
  """What the merged call does by default (each is a per-request input of search_with_options too).

  Attributes:
    depth: candidates each channel's index returns at most (and by default); 0 takes 2 * k, which
      leaves the merge and the re-rankers room to choose (docs/performance.md, "Channels").
    weights: channel weights in the pooled score, by channel name (missing: 1).
    min_relevance: drop candidates whose relevance probability is below it.
    diversity, window, gamma, theta: the default re-ranking (`engine.channels.Defaults`).
    calibration_examples: held-out examples the calibrations are fit on.
  """

  depth: int = 0
  weights: dict[str, float] = dataclasses.field(default_factory=dict)
  min_relevance: float = 0.0
  diversity: str = channels.Defaults.diversity
  window: int = channels.Defaults.window
  gamma: float = channels.Defaults.gamma
  theta: float = channels.Defaults.theta
  calibration_examples: int = 2000

  def __post_init__(self):
    if self.diversity not in channels.DIVERSITY_METHODS:
      raise ValueError(f"diversity must be one of {channels.DIVERSITY_METHODS}, got {self.diversity!r}")
    if self.depth < 0:
      raise ValueError(f"channel depth must be 0 (2k) or more, got {self.depth}")
    if self.calibration_examples < 10:
      raise ValueError(f"calibration_examples must be at least 10, got {self.calibration_examples}")
    # The knobs requests are held to; rules on every channel's weight together wait for `defaults`,
    # which knows the run's channels.
    knob_rules.check(dataclasses.asdict(self), partial=True)

  def defaults(self, names: list[str], depth: int) -> channels.Defaults:
    """The `serving_default` knobs of channels `names`, each `depth` deep (ValueError if a rule refuses them)."""
    unknown = set(self.weights) - set(names)
    if unknown:
      raise ValueError(f"channel weights name channels this run lacks: {sorted(unknown)} (it has {names})")
    return channels.Defaults(
      weights=tuple(float(self.weights.get(name, 1.0)) for name in names),
      depths=tuple(depth for _ in names),
      min_relevance=self.min_relevance,
      diversity=self.diversity,
      window=self.window,
      gamma=self.gamma,
      theta=self.theta,
    )


@dataclasses.dataclass
class BuiltChannels:
  """A channel graph built in process, ready to publish."""

  graph: channels.ChannelGraph
  catalogs: dict[str, catalog_lib.EmbeddedCatalog]
  samples: dict[str, np.ndarray]
  recall: dict[str, float]
  calibration: dict[str, dict[str, Any]]
  timings: dict[str, float]
  serving: precision_lib.ServingOptions
  data: dict[str, Any]


def _merged_candidates(found: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """The rows the merge ranks for each query: the union of every channel's top-depth rows.

  Args:
    found: each channel's recalled rows [Q, depth_c] (-1 where it found none).

  Returns:
    rows [Q, M], sorted per query, and valid [Q, M]: each row once, padding and repeats left out.
  """
  rows = np.sort(np.concatenate(found, axis=1), axis=1)
  valid = rows >= 0
  valid[:, 1:] &= rows[:, 1:] != rows[:, :-1]
  return rows, valid


def _checked(name: str, kind: str, calibration: channels.Calibration, num: int, hits: int) -> channels.Calibration:
  """The calibration, unless its slope is not positive: then the export is refused.

  The merge ranks by sigmoid(slope * score + intercept), so a slope <= 0 ranks the channel's worst
  candidates first. Fit on the candidates the merge ranks, even 1-epoch channels that recall only a
  quarter to a third of the clicks at depth 100 fit clearly positive slopes (13.4 and 4.2 on 200
  examples); one that is not positive says the channel's scores do not rank clicks (or topics) at
  all. Clamping it to 0 would ship a channel that recalls but silently never votes, and a channel
  graph is published for serving, so the export stops and names the channel instead.
  """
  if not calibration.slope > 0:
    raise ValueError(
      f"channel {name}: its {kind} calibration's fitted slope is {calibration.slope:.4g}, not > 0, on the {num} "
      f"candidates ({hits} positive) the merge ranks for the calibration examples: its scores do not rank "
      f"{'clicks' if kind == 'click' else 'on-topic ads'}, and the merge would rank its worst candidates first. "
      "Check its training, or fit on more examples (fgr-export --calibration_examples)"
    )
  return calibration


def _calibrate(
  names: list[str],
  found: list[np.ndarray],
  queries: list[np.ndarray],
  embeddings: list[np.ndarray],
  positives: np.ndarray,
  judges: tuple[int, ...] = (),
  categories: np.ndarray | None = None,
  query_categories: np.ndarray | None = None,
) -> dict[str, tuple[channels.Calibration, channels.Calibration | None]]:
  """Fits every channel's click calibration, and a relevance calibration for each channel that judges it.

  The sample is what the merge ranks: for each held-out query, the union of every channel's
  top-depth candidates, each scored by every channel (an ad one channel found is judged by all).
  click = the candidate is the query's clicked ad; relevant = its category is the query's. A clicked
  ad no channel recalled is left out: the merge never ranks it, and appended at its own (low, below
  the channel's cut-off by construction) score it taught the fit that low scores get clicked.

  Args:
    names: the channels' names, in graph order.
    found: each channel's recalled rows [Q, depth] for the held-out queries (-1: none).
    queries, embeddings: each channel's query embeddings [Q, d_c] and catalog embeddings [N, d_c].
    positives: the catalog row [Q] of each query's clicked ad.
    judges: the indexes of the channels trained for relevance (the graph takes at most one), with
      `categories` [N] of the catalog and `query_categories` [Q].

  Returns:
    (click, relevance or None) calibrations by channel name.

  Raises:
    ValueError: no channel recalled any clicked ad, or a fitted slope is not positive.
  """
  rows, valid = _merged_candidates(found)
  clicked = rows == positives[:, np.newaxis]
  hits = int(clicked[valid].sum())
  if not hits:
    raise ValueError(
      f"no channel recalls the clicked ad of any of the {len(rows)} calibration examples at its depth, so no "
      "calibration can be fit: raise fgr-export --calibration_examples or --channel_depth"
    )
  out = {}
  for c, name in enumerate(names):
    scores = np.einsum("qd,qmd->qm", queries[c], embeddings[c][np.maximum(rows, 0)])[valid]
    click = _checked(name, "click", channels.fit_calibration(scores, clicked[valid]), len(scores), hits)
    topic = None
    if c in judges:
      relevant = (categories[np.maximum(rows, 0)] == query_categories[:, np.newaxis])[valid]
      topic = _checked(name, "relevance", channels.fit_calibration(scores, relevant), len(scores), int(relevant.sum()))
    out[name] = (click, topic)
  return out


def build_channel_graph(checkpoint_dir: str, config: exporter.ExportConfig, options: ChannelOptions) -> BuiltChannels:
  """Restores every channel of a `--channels` run and builds their merged graph in process."""
  names = channels_lib.read_channels(checkpoint_dir)
  if not names:
    raise ValueError(f"{checkpoint_dir} is not a `fgr-train --channels` run (no {channels_lib.CHANNELS_FILE})")
  depth = options.depth or 2 * config.k
  # Both refused before any tower is restored: a bad default or a k the channels cannot fill would
  # otherwise surface only after the build, or as a calibration that blames training.
  channel_defaults = options.defaults(names, depth)
  channels.check_k(config.k, [depth] * len(names))
  defaults = precision_lib.serving_defaults()
  serving = precision_lib.ServingOptions(
    precision=config.precision or defaults.precision,
    jit_compile=defaults.jit_compile if config.jit_compile is None else config.jit_compile,
  )
  timings = {"embed": 0.0, "build": 0.0}
  catalogs, recall, calibration = {}, {}, {}
  models, indexes, queries = [], [], []  # Per channel, in graph order.
  judges: list[int] = []  # The channels trained for relevance: engine.channels refuses more than one.
  data_spec = None
  source = held_out = samples = None
  for name in names:
    started = time.time()
    model, run_config = train.restore(
      channels_lib.channel_dir(checkpoint_dir, name), precision=serving.precision, jit_compile=serving.jit_compile
    )
    if data_spec is None:
      data_spec = run_config["data"]
      source = sources.open_source(sources.DataSpec.from_json(data_spec))
      base.check_k(config.k, source.num_items)  # Before any catalog is embedded and indexed.
      base.backend(config.index).check_values(config.index_options, min(depth, source.num_items), source.num_items)
      held_out = queries_lib.held_out_examples(source, options.calibration_examples)
      samples = {n: held_out[n] for n in schema.QUERY_FEATURE_NAMES}
    elif run_config["data"] != data_spec:
      raise ValueError(f"channel {name} was trained on other data than {names[0]}: one catalog serves every channel")
    catalog = catalog_lib.embed_catalog(model.item_tower, source)
    timings["embed"] += time.time() - started
    depth = min(depth, len(catalog.ids))
    embedded = tf.function(model.query_tower)({n: tf.constant(v) for n, v in samples.items()}).numpy()
    started = time.time()
    index = base.build_index(
      config.index,
      catalog.embeddings,
      k=depth,
      eligible=catalog.eligible,
      tuning_queries=embedded[len(embedded) // 2 :],
      **config.index_options,
    )
    timings["build"] += time.time() - started
    recall[name] = round(
      verify.index_recall(index, embedded[: len(embedded) // 2], catalog.embeddings, catalog.eligible, depth), 4
    )
    models.append(model)
    indexes.append(index)
    queries.append(embedded)
    if run_config["tower"].objective == "relevance":
      judges.append(len(models) - 1)
    catalogs[name] = catalog
  # Calibrated once every index is built: each channel is fit on the candidates of all of them.
  found = [
    tf.function(lambda q, index=index: index.search(q, depth).indices)(tf.constant(q)).numpy()
    for index, q in zip(indexes, queries)
  ]
  positives = np.asarray([source.row_of(str(ad_id)) for ad_id in held_out[schema.AD_ID]], dtype=np.int64)
  categories = query_categories = None
  if judges:
    categories = sequences.catalog_column(source, schema.CATEGORY)
    query_categories = held_out.get(schema.QUERY_CATEGORY, held_out[schema.CATEGORY])
  embeddings = [catalogs[name].embeddings for name in names]
  fitted = _calibrate(names, found, queries, embeddings, positives, tuple(judges), categories, query_categories)
  built_channels = []
  for name, model, index in zip(names, models, indexes):
    click, relevance = fitted[name]
    calibration[name] = {"click": click.to_json(), **({"relevance": relevance.to_json()} if relevance else {})}
    built_channels.append(
      channels.Channel(
        name, model.query_tower, model.item_tower, index, catalogs[name].embeddings, depth, click, relevance
      )
    )
  ids = catalogs[names[0]].ids
  channel_defaults = dataclasses.replace(channel_defaults, depths=tuple(depth for _ in names))
  graph = channels.ChannelGraph(
    built_channels,
    ids,
    config.k,
    channel_defaults,
    schema.query_specs(),
    schema.item_specs(),
    exclusions=config.exclusions,
  )
  return BuiltChannels(graph, catalogs, samples, recall, calibration, timings, serving, data_spec)


def publish_channels(
  built: BuiltChannels, model_base_path: str, config: exporter.ExportConfig, options: ChannelOptions
) -> dict[str, Any]:
  """Saves a built channel graph as BASE/<version>/ atomically, with warm-up records and its report."""
  graph = built.graph
  first = graph.channel_names[0]
  catalog = built.catalogs[first]
  num_samples = len(built.samples[schema.USER_ID])
  started = time.time()
  with versions.publish(model_base_path, config.version) as (temp_path, version):
    graph.save(temp_path)
    exporter.check_signatures(temp_path, model_base_path, config)
    warmup.write_warmup(temp_path, warmup.sample_requests(built.samples, config.num_warmup_requests))
    for name, channel_catalog in built.catalogs.items():
      refresh_state.write_embeddings(temp_path, channel_catalog.embeddings, channel=name)
    report = version_report.VersionReport(
      version=version,
      path=os.path.join(model_base_path, str(version)),
      index=config.index,
      k=config.k,
      exclusions=config.exclusions,
      data=built.data,
      precision=built.serving.precision,
      jit_compile=built.serving.jit_compile,
      needs_xla=bool(stock_ops.xla_compiled_functions(temp_path)),
      index_options=config.index_options,
      index_config=dict(graph.channels[0].index.config),
      num_items=int(len(catalog.ids)),
      num_eligible=int(catalog.eligible.sum()),
      index_bytes=int(sum(channel.index.nbytes() for channel in graph.channels)),
      extra={
        CHANNELS: graph.channel_names,
        "channel_recall_vs_exact": built.recall,
        CALIBRATION: built.calibration,
        CALIBRATION_EXAMPLES: int(num_samples),
        CHANNEL_DEFAULTS: graph.defaults.to_json(),
        refresh_state.CHANNEL_INDEX_CONFIGS: {c.channel_name: dict(c.index.config) for c in graph.channels},
      },
    )
    for step, seconds in built.timings.items():
      report.time(step, seconds, digits=2)
    version_report.write(temp_path, report)
  report.time("write", time.time() - started, digits=2)
  logging.info("Exported channels %s as version %d to %s", graph.channel_names, version, report.path)
  return report.to_json()


def export_channels(
  checkpoint_dir: str, model_base_path: str, config: exporter.ExportConfig, options: ChannelOptions
) -> dict[str, Any]:
  """Exports every channel of a `fgr-train --channels` run as one version (see `publish_channels`)."""
  return publish_channels(build_channel_graph(checkpoint_dir, config, options), model_base_path, config, options)
