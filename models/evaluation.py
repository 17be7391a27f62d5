"""Evaluation against the whole catalog: TFRS's FactorizedTopK, exact ranks for fgr-eval, a Keras callback."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from models import baselines, metrics
from models import catalog as catalog_lib
from models.data import schema, sequences

EXAMPLE_FEATURES = schema.QUERY_FEATURE_NAMES + schema.ITEM_FEATURE_NAMES
NO_TEST_EXAMPLES = "the test split holds no examples to evaluate"


class NoTestExamples(ValueError):
  """The test split is empty: every metric would be NaN."""


def top_k_accuracy(
  query_tower: tf.keras.Model,
  item_tower: tf.keras.Model,
  table: sequences.ItemTable,
  examples: Iterable[dict[str, np.ndarray]],
  ks: tuple[int, ...] = (1, 10, 50, 100),
) -> dict[str, float]:
  """Share of examples whose clicked item is among the top k of the whole catalog, for each k.

  This is the metric the TFRS tutorials report ("factorized_top_k/top_100_categorical_accuracy").

  Raises:
    NoTestExamples: `examples` holds none.
  """
  catalog = catalog_lib.embed_catalog(item_tower, table)
  # A catalog smaller than k is recalled whole: top-k accuracy there is that of k = the catalog's size
  # (TF's top-k refuses a k above it).
  cut = tuple(min(k, len(catalog.ids)) for k in ks)
  index = tfrs.layers.factorized_top_k.BruteForce(k=max(cut))
  index.index(tf.constant(catalog.embeddings), tf.constant(np.asarray(catalog.ids, dtype=object)))
  metric = tfrs.metrics.FactorizedTopK(candidates=index, ks=sorted(set(cut)))
  encode_query = tf.function(query_tower)
  encode_item = tf.function(item_tower)
  seen = 0
  for batch in examples:
    tensors = {name: tf.constant(batch[name]) for name in EXAMPLE_FEATURES}
    metric.update_state(encode_query(tensors), encode_item(tensors), true_candidate_ids=tensors[schema.AD_ID])
    seen += len(batch[schema.AD_ID])
  if not seen:  # The metric would read 0.0, as if every example were missed.
    raise NoTestExamples(NO_TEST_EXAMPLES)
  accuracy = {k: float(value.numpy()) for k, value in zip(sorted(set(cut)), metric.result())}
  return {f"top_{k}": accuracy[c] for k, c in zip(ks, cut)}


class TopKValidation(tf.keras.callbacks.Callback):
  """Adds "val_top_<k>" (full-catalog top-k accuracy on held-out examples) to each epoch's logs.

  Keras' own validation would report the in-batch loss, which is not what retrieval is judged on;
  early stopping and best-checkpoint selection monitor this metric instead.

  Args:
    table: the catalog.
    examples: held-out example batches.
    k: cut-off.
  """

  def __init__(self, table: sequences.ItemTable, examples: list[dict[str, np.ndarray]], k: int):
    super().__init__()
    self.table = table
    self.examples = examples
    self.k = k

  def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
    value = top_k_accuracy(self.model.query_tower, self.model.item_tower, self.table, self.examples, ks=(self.k,))[
      f"top_{self.k}"
    ]
    if logs is not None:
      logs[f"val_top_{self.k}"] = value


Scorer = Callable[[dict[str, np.ndarray]], tf.Tensor]


def tower_scorer(query_tower: tf.keras.Model, catalog: catalog_lib.EmbeddedCatalog) -> Scorer:
  """Scores [n, N] of a batch's queries against every catalog row: query embedding · item embedding."""
  encode = tf.function(query_tower)
  items = tf.constant(catalog.embeddings)

  def score(batch: dict[str, np.ndarray]) -> tf.Tensor:
    queries = encode({name: tf.constant(batch[name]) for name in schema.QUERY_FEATURE_NAMES})
    return tf.matmul(queries, items, transpose_b=True)

  return score


def baseline_scorer(baseline: baselines.Baseline, row_of) -> Scorer:
  """Scores [n, N] of a batch's queries from a baseline (see `models.baselines`)."""
  return lambda batch: tf.constant(baseline.scores(batch, row_of))


def rank_examples(
  score: Scorer,
  row_of,
  examples: Iterable[dict[str, np.ndarray]],
  k: int,
  extra: tuple[str, ...] = (),
  exclude_history: bool = False,
) -> dict[str, np.ndarray]:
  """Exact full-catalog retrieval of every example's query, with its clicked item's rank.

  Args:
    score: scores a batch's queries against every catalog row (`tower_scorer`, `baseline_scorer`).
    row_of: maps an ad id to its catalog row.
    examples: example batches.
    k: how many items to recall per query.
    extra: further example fields to pass through (e.g. "converted"), when present.
    exclude_history: never recall an item of the query's own history, as a graph exported with
      `--exclude_history` serves (a clicked item in the history then counts as missed).

  Returns:
    "rank" int [n] (0-based rank of the clicked item among all items), "recalled" int [n, k] rows,
    "positive" int [n] the clicked item's row, plus the `extra` fields found.
  """
  out: dict[str, list[np.ndarray]] = {"rank": [], "recalled": [], "positive": []}
  for batch in examples:
    if not len(batch[schema.AD_ID]):
      continue
    positives = np.asarray([row_of(str(ad_id)) for ad_id in batch[schema.AD_ID]], dtype=np.int64)
    scores = score(batch)
    if exclude_history:
      scores = _without_history(scores, baselines.catalog_rows(batch[schema.HIST_IDS], row_of))
    positive_scores = tf.gather(scores, positives, batch_dims=1)
    out["rank"].append(tf.reduce_sum(tf.cast(scores > positive_scores[:, tf.newaxis], tf.int64), axis=1).numpy())
    out["recalled"].append(tf.math.top_k(scores, k=min(k, int(scores.shape[1]))).indices.numpy())
    out["positive"].append(positives)
    for name in extra:
      if name in batch:
        out.setdefault(name, []).append(np.asarray(batch[name]))
  if not out["rank"]:
    # Every metric would be NaN; numpy said only "need at least one array to concatenate".
    raise NoTestExamples(NO_TEST_EXAMPLES)
  return {name: np.concatenate(values) for name, values in out.items()}


def no_test_examples(source: Any) -> NoTestExamples:
  """The error for a source whose test split is empty, saying how the split was cut when it can."""
  summary = getattr(source, "events_summary", None)
  return NoTestExamples(f"{NO_TEST_EXAMPLES}: {summary}" if summary else NO_TEST_EXAMPLES)


def _without_history(scores: tf.Tensor, history: np.ndarray) -> tf.Tensor:
  """Scores [n, N] with each query's history rows [n, L] (-1: padding) set to -inf."""
  query, position = np.nonzero(history >= 0)
  indices = np.stack([query, history[query, position]], axis=1)
  return tf.tensor_scatter_nd_update(scores, indices, tf.fill([len(indices)], tf.constant(-np.inf, scores.dtype)))


def _limited(batches: Iterable[dict[str, np.ndarray]], max_examples: int) -> Iterable[dict[str, np.ndarray]]:
  """The first `max_examples` examples of a batch stream (all of them when max_examples <= 0)."""
  remaining = max_examples if max_examples > 0 else None
  for batch in batches:
    if remaining is not None:
      batch = {name: values[:remaining] for name, values in batch.items()}
      remaining -= len(batch[schema.AD_ID])
    yield batch
    if remaining is not None and remaining <= 0:
      return


def _rebatched(batches: Iterable[dict[str, np.ndarray]], size: int) -> Iterable[dict[str, np.ndarray]]:
  """The same examples in batches of at most `size`, so a baseline's dense scores stay bounded."""
  for batch in batches:
    for start in range(0, len(batch[schema.AD_ID]), size):
      yield {name: values[start : start + size] for name, values in batch.items()}


def summarise(
  ranked: dict[str, np.ndarray], ks: tuple[int, ...], categories: np.ndarray, new_items: np.ndarray | None = None
) -> dict[str, Any]:
  """ "ranking" at every K and "water_level" at the largest of `rank_examples`-shaped results."""
  water = metrics.water_level_metrics(
    ranked["recalled"], ranked["positive"], ranked.get(schema.CONVERTED), categories, new_items
  )
  return {"ranking": metrics.ranking_metrics(ranked["rank"], ks), "water_level": {"k": max(ks), **water}}


def judge_baselines(
  source: Any,
  test_examples: Callable[[], Iterable[dict[str, np.ndarray]]],
  ks: tuple[int, ...],
  categories: np.ndarray,
  new_items: np.ndarray | None = None,
  exclude_history: bool = False,
) -> dict[str, Any]:
  """`summarise` of popularity and item co-occurrence, fit on the training split, on `test_examples()`.

  The examples are re-batched so that a batch's dense scores stay within `baselines.MAX_SCORES`.
  """
  batch_size = max(1, baselines.MAX_SCORES // source.num_items)
  return {
    baseline.name: summarise(
      rank_examples(
        baseline_scorer(baseline, source.row_of),
        source.row_of,
        _rebatched(test_examples(), batch_size),
        max(ks),
        (schema.CONVERTED,),
        exclude_history,
      ),
      ks,
      categories,
      new_items,
    )
    for baseline in baselines.fit_baselines(source, source.examples("train"))
  }


def evaluate(
  query_tower: tf.keras.Model,
  item_tower: tf.keras.Model,
  source: Any,
  ks: tuple[int, ...] = (10, 50, 100),
  max_examples: int = 0,
  with_baselines: bool = True,
  exclude_history: bool = False,
) -> dict[str, Any]:
  """Everything fgr-eval reports on a source's test split, retrieving exactly over the whole catalog.

  Returns:
    "ranking": Recall/HitRate/NDCG@K; "water_level" at the largest K: coverage of clicks (and of
    conversions when the source logs them), noise ratio by category, and coverage of clicks on
    items added after training when the source knows them; "held_out_items": with a cold-start
    source, the coverage of held-out items' clicks against warm items'; "baselines" (with
    `with_baselines`): "ranking" and "water_level" of popularity and item co-occurrence, fit on the
    training split and judged on the same test examples. With `exclude_history`, no query recalls
    an item of its own history, for the model and the baselines alike (see `rank_examples`).
  """
  k = max(ks)
  catalog = catalog_lib.embed_catalog(item_tower, source)
  categories = sequences.catalog_column(source, schema.CATEGORY)
  new_items = source.items_added_after_training() if hasattr(source, "items_added_after_training") else None

  def test_examples():
    return _limited(source.examples("test"), max_examples)

  try:
    ranked = rank_examples(
      tower_scorer(query_tower, catalog), source.row_of, test_examples(), k, (schema.CONVERTED,), exclude_history
    )
  except NoTestExamples:
    raise no_test_examples(source) from None
  report: dict[str, Any] = {
    "num_examples": int(len(ranked["rank"])),
    "num_items": int(source.num_items),
    "exclude_history": exclude_history,
  }
  report.update(summarise(ranked, ks, categories, new_items))
  held_out = getattr(source, "held_out_rows", None)
  if held_out is not None:
    cold = held_out[ranked["positive"]]
    cold_metrics = metrics.ranking_metrics(ranked["rank"][cold], ks) if cold.any() else {}
    warm_metrics = metrics.ranking_metrics(ranked["rank"][~cold], ks)
    report["held_out_items"] = {
      "num_examples": int(cold.sum()),
      "held_out": cold_metrics,
      "warm": warm_metrics,
      f"recall@{k}_ratio": cold_metrics.get(f"recall@{k}", float("nan")) / max(warm_metrics[f"recall@{k}"], 1e-12),
    }
  if with_baselines:
    report["baselines"] = judge_baselines(source, test_examples, ks, categories, new_items, exclude_history)
  return report
