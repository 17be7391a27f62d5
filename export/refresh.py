"""Publishes version N+1 of a served model from version N and a catalog delta, without retraining.

Version N already holds everything a refresh needs: its towers (variables and traced functions), its
`encode_item` signature, its catalog state (`refresh_state`) and its warm-up records. A refresh

- embeds new and changed ads with N's own `encode_item`, so their embeddings match the served towers
  bit for bit;
- rebuilds only the index, with N's backend, k and tuned search knobs;
- writes the new index's variables under N's own graph when that graph fits them (ScaNN updated with
  N's search knobs, `source_graph_replacements`): N's saved_model.pb is hard-linked and nothing is
  traced, so a server can also reuse the graph it imported for N. Otherwise it saves a module that
  reuses N's restored tower functions and variables (no Python tower code runs and nothing in the
  towers is traced again; only the small serving functions around the new index are traced);
- copies N's warm-up records, and publishes atomically (`versions.publish`).

A status-only delta (pause/resume) does not load N at all: the new version is N's files, hard-linked,
with the variables checkpoint rewritten so that only the eligibility mask differs. Servers compare
nothing but the version number, so this is a full, independent version.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable

import numpy as np
import tensorflow as tf
from absl import logging

from engine import base, full_graph, scann_index, scann_update
from export import refresh_checkpoint, refresh_delta, refresh_retrain, refresh_state, verify, versions, warmup

REPORT_FILE = "export_report.json"  # The same file fgr-export writes: it tells the next refresh k and the index.
FINGERPRINT_FILE = "fingerprint.pb"
_REPORT_PATH = os.path.join(refresh_state.EXTRA_DIR, REPORT_FILE)
_EMBEDDINGS_PATH = os.path.join(refresh_state.EXTRA_DIR, refresh_state.EMBEDDINGS_FILE)
EMBED_BATCH_SIZE = 8192
# Search knobs a backend tunes at build time. A refresh reuses N's values: the catalog changed a
# little, and tuning (timed searches) would cost more than the rest of the build.
_TUNED_KNOBS = {"scann": ("leaves_to_search", "reorder", "final_candidates")}
# How a refresh builds a ScaNN index: "auto" updates N's index (N's trained partitioner and codebook,
# only new and changed rows encoded) until too many rows were encoded since the last training,
# then trains anew; "full" always trains anew.
INDEX_UPDATES = ("auto", "full")
DEFAULT_RETRAIN_FRACTION = 0.2
# ScaNN options that change what a build trains or stores: overriding one of them needs a full build.
_SCANN_STRUCTURE = ("scoring", "num_leaves", "dimensions_per_block", "anisotropic_quantization_threshold",
                    "partitioning")
# ScaNN options that are search-time knobs: an incremental update takes them as they are.
_SCANN_SEARCH_KNOBS = ("leaves_to_search", "reorder", "final_candidates", "overfetch")


def _import_custom_ops(report: dict[str, Any]) -> None:
  """Registers ScaNN's TF ops before loading or rewriting a version that uses them."""
  if report.get("index") == "scann":
    import scann  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import


def read_report(version_path: str) -> dict[str, Any]:
  """The export (or refresh) report a version carries in assets.extra."""
  path = os.path.join(version_path, refresh_state.EXTRA_DIR, REPORT_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: fgr-refresh needs a version written by fgr-export or fgr-refresh")
  with open(path) as f:
    return json.load(f)


def link_tree(source: str, destination: str, skip: tuple[str, ...] = ()) -> None:
  """Recreates `source` at `destination` with hard links (copies across file systems).

  Versions are never modified in place, so sharing their files between versions is safe. `skip` holds
  paths relative to `source` (files or directories) to leave out.
  """
  for root, dirs, files in os.walk(source):
    relative = os.path.relpath(root, source)
    dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(relative, d)) not in skip]
    os.makedirs(os.path.join(destination, relative), exist_ok=True)
    for name in files:
      path = os.path.normpath(os.path.join(relative, name))
      if path in skip:
        continue
      link_file(os.path.join(source, path), os.path.join(destination, path))


def link_file(source: str, destination: str) -> None:
  """Hard-links a file of a published version (never modified in place), or copies it across file systems."""
  try:
    os.link(source, destination)
  except OSError:
    shutil.copy2(source, destination)


def read_warmup_queries(version_path: str) -> list[dict[str, np.ndarray]]:
  """The query features of a version's warm-up Predict requests (one dict per request)."""
  path = os.path.join(version_path, refresh_state.EXTRA_DIR, warmup.WARMUP_FILE)
  if not os.path.exists(path):
    return []
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-import-not-at-top
  queries = []
  for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
    request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
    queries.append({name: tf.make_ndarray(proto) for name, proto in request.inputs.items()})
  return queries


class RestoredTower(tf.Module):
  """One tower of a loaded version, called through that version's encode function.

  The function was traced when the towers were exported; calling it from a new tf.function embeds it
  as a function call, so the tower is not traced again and its variables are the exported ones.
  Both are saved with the new version (`owner` holds the variables, `encode` the function), so a
  refresh of that version calls the same function again instead of wrapping a wrapper.

  Args:
    owner: the restored tower object holding the tower's variables.
    encode: the exported encode function (features as keyword arguments -> {"embedding": [B, d]}).
  """

  def __init__(self, owner: tf.Module, encode: Callable[..., dict[str, tf.Tensor]], name: str):
    super().__init__(name=name)
    self.owner = owner
    self.encode = encode

  @classmethod
  def from_loaded(cls, loaded_tower: Any, signature: Callable[..., dict[str, tf.Tensor]], name: str) -> "RestoredTower":
    """The tower of a loaded version: unwraps one saved by a refresh, else calls the version's signature."""
    if hasattr(loaded_tower, "owner") and hasattr(loaded_tower, "encode"):
      return cls(loaded_tower.owner, loaded_tower.encode, name)
    return cls(loaded_tower, signature, name)

  def __call__(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
    return self.encode(**features)["embedding"]


@dataclasses.dataclass
class LoadedTowers:
  """A version's towers, restored once and reused for every later version built from them."""

  query_tower: RestoredTower
  item_tower: RestoredTower
  query_specs: dict[str, tf.TensorSpec]
  item_specs: dict[str, tf.TensorSpec]
  encode_item: Callable[..., dict[str, tf.Tensor]]
  encode_query: Callable[..., dict[str, tf.Tensor]]

  @classmethod
  def load(cls, version_path: str) -> "LoadedTowers":
    loaded = tf.saved_model.load(version_path)
    encode_query = loaded.signatures[full_graph.ENCODE_QUERY]
    encode_item = loaded.signatures[full_graph.ENCODE_ITEM]
    return cls(query_tower=RestoredTower.from_loaded(loaded.query_tower, encode_query, "query_tower"),
               item_tower=RestoredTower.from_loaded(loaded.item_tower, encode_item, "item_tower"),
               query_specs=dict(encode_query.structured_input_signature[1]),
               item_specs=dict(encode_item.structured_input_signature[1]),
               encode_item=encode_item, encode_query=encode_query)

  def embed_items(self, features: dict[str, np.ndarray]) -> np.ndarray:
    """float32 [B, d] embeddings of raw item features, in batches."""
    count = len(features[next(iter(features))])
    parts = [np.zeros([0, 0], np.float32)]
    for start in range(0, count, EMBED_BATCH_SIZE):
      batch = {name: tf.constant(values[start:start + EMBED_BATCH_SIZE]) for name, values in features.items()}
      parts.append(self.encode_item(**batch)["embedding"].numpy())
    return np.concatenate(parts[1:]) if count else parts[0]


@dataclasses.dataclass
class Source:
  """The version a refresh starts from."""

  version: int
  path: str
  report: dict[str, Any]
  state: refresh_state.CatalogState
  row_of: dict[str, int]

  @classmethod
  def read(cls, base_path: str, version: int) -> "Source":
    path = os.path.join(base_path, str(version))
    if version not in versions.list_versions(base_path):
      raise FileNotFoundError(f"No complete version {version} under {base_path}")
    report = read_report(path)
    state = refresh_state.read_state(path)
    return cls(version, path, report, state, state.row_of())


def apply_delta(state: refresh_state.CatalogState, row_of: dict[str, int], delta: refresh_delta.CatalogDelta,
                embed: Callable[[dict[str, np.ndarray]], np.ndarray]
                ) -> tuple[refresh_state.CatalogState, dict[str, int], np.ndarray]:
  """The catalog after `delta`: changed rows re-embedded in place, new ads appended, removed rows dropped.

  Returns:
    The new state; counts (added, changed, removed, removals of unknown ads ignored, status changes);
    and int64 [N'] source rows: the row of `state` each new row copies unchanged, -1 where it was
    embedded anew (new and changed ads), which lets an index reuse what it computed for the rest.
  """
  delta.check_against(row_of)
  eligible = state.eligible.copy()
  for ad_id, status in delta.statuses.items():
    eligible[row_of[ad_id]] = status == "active"
  upsert_ids, features = delta.item_features()
  upsert_rows = np.asarray([row_of.get(ad_id, -1) for ad_id in upsert_ids], dtype=np.int64)
  upsert_active = np.asarray([delta.upserts[ad_id].status == "active" for ad_id in upsert_ids], dtype=bool)
  upsert_embeddings = embed(features) if upsert_ids else np.zeros([0, state.embeddings.shape[1]], np.float32)
  changed = upsert_rows >= 0
  eligible[upsert_rows[changed]] = upsert_active[changed]
  removed_rows = [row_of[ad_id] for ad_id in delta.removals if ad_id in row_of]
  keep = np.ones(len(state.ids), dtype=bool)
  keep[removed_rows] = False
  # One pass over the (memory-mapped) rows: kept rows, then new ads; changed rows are overwritten in place.
  new_row = np.cumsum(keep) - 1
  num_kept = int(keep.sum())
  num_added = int((~changed).sum())
  embeddings = np.empty([num_kept + num_added, state.embeddings.shape[1]], np.float32)
  np.compress(keep, state.embeddings, axis=0, out=embeddings[:num_kept])
  embeddings[new_row[upsert_rows[changed]]] = upsert_embeddings[changed]
  embeddings[num_kept:] = upsert_embeddings[~changed]
  source_rows = np.concatenate([np.flatnonzero(keep), np.full([num_added], -1, np.int64)])
  source_rows[new_row[upsert_rows[changed]]] = -1
  new_state = refresh_state.CatalogState(
      ids=np.concatenate([state.ids[keep], np.asarray(upsert_ids, dtype=object)[~changed]]),
      embeddings=embeddings,
      eligible=np.concatenate([eligible[keep], upsert_active[~changed]]))
  counts = {"added": num_added, "changed": int(changed.sum()), "removed": len(removed_rows),
            "ignored_removals": len(delta.removals) - len(removed_rows), "status_changes": len(delta.statuses)}
  return new_state, counts, source_rows


def index_options(report: dict[str, Any]) -> dict[str, Any]:
  """N's index options plus the search knobs N's build tuned (so the rebuild does not tune again)."""
  options = dict(report.get("index_options", {}))
  config = report.get("index_config", {})
  for knob in _TUNED_KNOBS.get(report["index"], ()):
    if knob in config and knob not in options:
      options[knob] = config[knob]
  if report["index"] == "scann" and config.get("reorder", 0) > 0 and "final_candidates" not in options:
    # N predates the knob: keep its graph.
    options["final_candidates"] = scann_index.returned_candidates(config, report["k"])
  if report["index"] == "scann" and "partitioning" not in options:
    options["partitioning"] = _built_partitioning(config)  # A retrain partitions as N did.
  return options


def _base_report(source: Source, version: int, base_path: str, kind: str, state: refresh_state.CatalogState) -> dict[str, Any]:
  return {
      "version": version,
      "path": os.path.join(base_path, str(version)),
      "kind": kind,
      "refreshed_from": source.version,
      "index": source.report["index"],
      "k": source.report["k"],
      "index_options": source.report.get("index_options", {}),
      "index_config": source.report.get("index_config", {}),
      "num_items": int(len(state.ids)),
      "num_eligible": int(state.eligible.sum()),
  }


def _write_report(saved_model_dir: str, report: dict[str, Any]) -> None:
  path = os.path.join(saved_model_dir, refresh_state.EXTRA_DIR, REPORT_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=2)


def publish_status_only(base_path: str, source: Source, eligible: np.ndarray,
                        version: int | None = None) -> dict[str, Any]:
  """Publishes N's graph and index with a new eligibility mask: no load, no embedding, no build."""
  _import_custom_ops(source.report)
  state = dataclasses.replace(source.state, eligible=eligible)
  started = time.perf_counter()
  with versions.publish(base_path, version) as (temp_path, version):
    link_tree(source.path, temp_path, skip=("variables", FINGERPRINT_FILE, _REPORT_PATH))
    refresh_checkpoint.rewrite_checkpoint(refresh_state.variables_prefix(source.path),
                                          refresh_state.variables_prefix(temp_path),
                                          {refresh_state.ELIGIBLE_KEY: eligible})
    refresh_checkpoint.write_fingerprint(temp_path)
    report = _base_report(source, version, base_path, "status_only", state)
    report["write_seconds"] = round(time.perf_counter() - started, 3)
    _write_report(temp_path, report)
  report["published_at"] = time.time()  # When servers can see it: after the rename.
  report["publish_seconds"] = round(time.perf_counter() - started, 3)
  return report


def warmup_recall(version_path: str, towers: LoadedTowers, index: base.Index, state: refresh_state.CatalogState,
                  k: int) -> float | None:
  """recall@k of `index` against exact search for the queries of a version's warm-up records."""
  queries = read_warmup_queries(version_path)
  if not queries or state.eligible.sum() < k:
    return None
  embeddings = [towers.encode_query(**{name: tf.constant(values) for name, values in query.items()})["embedding"]
                for query in queries]
  recall = verify.index_recall(index, np.concatenate(embeddings), state.embeddings, state.eligible, k)
  return round(recall, 4)


def _full_build_reason(source: Source, options: dict[str, Any], fresh_rows: int, num_rows: int, update: str,
                       retrain_fraction: float, background: bool = False) -> str | None:
  """Why the index must be trained anew rather than updated from N's training (None: it need not)."""
  config = source.report.get("index_config", {})
  if update == "full":
    return "--index_update=full"
  if source.report["index"] != "scann":
    return f"the {source.report['index']} backend has no incremental update"
  changed = [name for name in _SCANN_STRUCTURE if name in options and _differs(config, name, options[name])]
  if "reorder" in options and (options["reorder"] > 0) != (config.get("reorder", 0) > 0):
    changed.append("reorder")
  if changed:
    return f"index options {changed} differ from version {source.version}'s build"
  encoded = config.get("rows_encoded_since_training", 0) + fresh_rows
  if encoded > retrain_fraction * num_rows and not background:
    return f"{encoded} of {num_rows} rows encoded since the last training (over {retrain_fraction:g})"
  return None


def _built_partitioning(config: dict[str, Any]) -> str:
  """The k-means a version's ScaNN tree was built with (generic for versions from before the option)."""
  return config.get("partitioning", "generic")


def _differs(config: dict[str, Any], name: str, value: Any) -> bool:
  """Whether ScaNN option `name` = `value` differs from the build `config` records."""
  if name == "partitioning":
    return value != "auto" and value != _built_partitioning(config)  # "auto" keeps the version's.
  return value != config.get(name)


def rebuild_index(source: Source, state: refresh_state.CatalogState, source_rows: np.ndarray,
                  options: dict[str, Any], update: str = "auto",
                  retrain_fraction: float = DEFAULT_RETRAIN_FRACTION,
                  retrained: tuple[scann_update.ScannAssets, np.ndarray, dict[str, Any]] | None = None,
                  background: bool = False) -> base.Index:
  """N's index type over `state`: N's ScaNN index updated in place of a retrain when it can be.

  The update (`engine.scann_update`) keeps N's partitioner, codebook and tuned search knobs, copies the
  tokens and codes of the rows `source_rows` maps to N, and encodes only the others. The index config
  counts the rows encoded since the last training; past `retrain_fraction` of the catalog (or when
  `options` change the index's structure) the index is trained anew, as fgr-export would.

  Args:
    source: version N.
    state: the new catalog.
    source_rows: int64 [N'], the row of N that new row i copies unchanged, or -1.
    options: N's index options with the refresher's overrides.
    update: one of INDEX_UPDATES.
    retrain_fraction: share of the catalog encoded since training beyond which a full build runs.
    retrained: (assets, rows, config) of a finished background retrain (`refresh_retrain`): the update
      starts from its training instead of N's, `rows` (the snapshot row of each row of `state`, -1
      where changed since) taking the place of `source_rows`.
    background: a background retrain takes care of the threshold: past it, keep updating.
  """
  if update not in INDEX_UPDATES:
    raise ValueError(f"index update must be one of {INDEX_UPDATES}, got {update!r}")
  k = source.report["k"]
  fresh_rows = int((source_rows < 0).sum())
  reason = _full_build_reason(source, options, fresh_rows, len(state.ids), update, retrain_fraction,
                              background or retrained is not None)
  started = time.perf_counter()
  if reason is None:
    try:
      if retrained is not None:
        assets, source_rows, config = retrained
        fresh_rows, kind, encoded_before = int((source_rows < 0).sum()), "retrained", 0
      else:
        assets = scann_update.ScannAssets.from_checkpoint(refresh_state.variables_prefix(source.path),
                                                          source.state.embeddings)
        config = dict(source.report["index_config"])
        kind, encoded_before = "incremental", config.get("rows_encoded_since_training", 0)
      assets = scann_update.update(assets, state.embeddings, source_rows)
    except (KeyError, ValueError) as e:
      reason = f"the ScaNN assets cannot be updated: {e}"
    else:
      config = {name: value for name, value in config.items() if name != "full_build_reason"}
      config.update({name: options[name] for name in _SCANN_SEARCH_KNOBS if name in options})
      # This build trained nothing; its time is the update's (N's build_seconds would mislead).
      config.update({"update": kind, "encoded_rows": fresh_rows, "rows_encoded_since_training": encoded_before + fresh_rows,
                     "train_seconds": 0.0, "build_seconds": round(time.perf_counter() - started, 3)})
      return scann_update.index_from_assets(assets, config, state.eligible)
  logging.info("Training the index anew: %s", reason)
  index = base.build_index(source.report["index"], state.embeddings, k=k, eligible=state.eligible, **options)
  if isinstance(getattr(index, "config", None), dict):
    index.config.update({"update": "full", "full_build_reason": reason, "rows_encoded_since_training": 0})
  return index


def source_graph_replacements(source: Source, index: base.Index, state: refresh_state.CatalogState
                              ) -> tuple[dict[str, Any] | None, str | None]:
  """The checkpoint tensors under which N's graph serves `index` over `state`, or (None, why not).

  N's serving functions read the catalog (ids, eligibility, ScaNN assets) from variables and bake in
  only k and the search knobs, so when those match and N saved the catalog variables with unknown
  rows (`engine.base.catalog_variable`), a new checkpoint is the whole new version.
  """
  if source.report["index"] != "scann" or not isinstance(index, scann_index.ScannIndex):
    return None, f"the {source.report['index']} backend's graph depends on its build"
  k, config, source_config = source.report["k"], index.config, source.report.get("index_config", {})
  # num_leaves: the range search_with_options accepts for leaves_to_search.
  baked = ["num_leaves", "leaves_to_search", "reorder"] + (["overfetch"] if config.get("reorder", 0) <= 0 else [])
  changed = [name for name in baked if config.get(name) != source_config.get(name)]
  if (config.get("reorder", 0) > 0
      and scann_index.returned_candidates(config, k) != scann_index.returned_candidates(source_config, k)):
    changed.append("final_candidates")
  if changed:
    return None, f"search knobs {changed} differ from version {source.version}'s graph"
  if config.get("reorder", 0) <= 0 and k * config["overfetch"] > min(index.num_items, len(source.state.ids)):
    return None, "the candidate count depends on the catalog size"
  if index.num_items < k:
    return None, f"{index.num_items} items, fewer than k={k}"
  values: dict[str, Any] = {"item_ids": np.asarray(state.ids, dtype=object).astype(bytes),
                            "index/eligible": index.eligible}
  values.update({f"index/state/{name}": getattr(index.state, name) for name in scann_index.ASSET_NAMES})
  # Versions exported before the exact fallback reused ScaNN's float dataset read a copy of their own.
  values["index/vectors"] = getattr(index, "vectors", index.state.dataset)
  prefix = refresh_state.variables_prefix(source.path)
  keys = refresh_checkpoint.variable_keys(prefix, values)
  if "index/vectors" not in keys and not hasattr(index, "vectors"):
    del values["index/vectors"]
  shapes = refresh_checkpoint.saved_variable_shapes(source.path, values)
  catalog_keys = {key for key in tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
                  if key.startswith(("index/", "item_ids/"))}
  if set(keys) != set(values) or set(shapes) != set(values) or set(keys.values()) != catalog_keys:
    return None, f"version {source.version}'s index variables are not this index's"
  for path, value in values.items():
    if not shapes[path].is_compatible_with(np.shape(value) if isinstance(value, np.ndarray) else value.shape):
      return None, f"version {source.version}'s graph saved {path} with shape {shapes[path]}"
  return {keys[path]: value for path, value in values.items()}, None


def publish_rebuilt(base_path: str, source: Source, towers: LoadedTowers, state: refresh_state.CatalogState,
                    timings: dict[str, float], index_overrides: dict[str, Any] | None = None,
                    verify_recall: bool = True, version: int | None = None, source_rows: np.ndarray | None = None,
                    index_update: str = "auto", retrain_fraction: float = DEFAULT_RETRAIN_FRACTION,
                    retrained: tuple[scann_update.ScannAssets, np.ndarray, dict[str, Any]] | None = None,
                    background: bool = False) -> dict[str, Any]:
  """Builds N's index type over `state` and publishes it with N's restored towers and warm-up records.

  Args:
    base_path: the model base path.
    source: version N.
    towers: N's restored towers.
    state: the catalog of the new version.
    timings: seconds spent so far, by step; the build and write steps are added.
    index_overrides: index options replacing N's (e.g. a smaller ScaNN training_sample_size).
    verify_recall: after publishing, measure the new index's recall@k on N's warm-up queries.
    version: explicit version number; the next free one when None.
    source_rows: int64 [N'], the row of N each row of `state` copies unchanged (-1: new or changed);
      None trains the index anew.
    index_update: one of INDEX_UPDATES (see `rebuild_index`).
    retrain_fraction, retrained, background: see `rebuild_index`.
  """
  k = source.report["k"]
  options = {**index_options(source.report), **(index_overrides or {})}
  started = time.perf_counter()
  if source_rows is None:
    source_rows, index_update = np.full([len(state.ids)], -1, np.int64), "full"
  index = rebuild_index(source, state, source_rows, options, index_update, retrain_fraction, retrained, background)
  timings["build_seconds"] = time.perf_counter() - started

  replacements, retrace_reason = source_graph_replacements(source, index, state)
  started = time.perf_counter()
  with versions.publish(base_path, version) as (temp_path, version):
    if replacements is not None:  # N's graph, hard-linked, over a new checkpoint: nothing is traced.
      link_tree(source.path, temp_path, skip=("variables", FINGERPRINT_FILE, _REPORT_PATH, _EMBEDDINGS_PATH))
      refresh_checkpoint.rewrite_checkpoint(refresh_state.variables_prefix(source.path),
                                            refresh_state.variables_prefix(temp_path), replacements,
                                            resizable=replacements.keys())
      refresh_checkpoint.write_fingerprint(temp_path)
    else:
      logging.info("Tracing the serving functions anew: %s", retrace_reason)
      full_graph.FullGraph(towers.query_tower, towers.item_tower, index, state.ids, k, towers.query_specs,
                           towers.item_specs).save(temp_path)
      extra = os.path.join(temp_path, refresh_state.EXTRA_DIR)
      os.makedirs(extra, exist_ok=True)
      warmup_path = os.path.join(source.path, refresh_state.EXTRA_DIR, warmup.WARMUP_FILE)
      if os.path.exists(warmup_path):
        link_file(warmup_path, os.path.join(extra, warmup.WARMUP_FILE))
    refresh_state.write_embeddings(temp_path, state.embeddings)
    report = _base_report(source, version, base_path, "rebuild", state)
    report["graph"] = f"version {source.version}'s" if replacements is not None else "traced"
    if retrace_reason:
      report["graph_traced_because"] = retrace_reason
    report["index_options"] = options
    report["index_config"] = dict(getattr(index, "config", report["index_config"]))
    report["index_update"] = report["index_config"].get("update", "full")
    report["index_bytes"] = index.nbytes()
    _write_report(temp_path, report)
  timings["write_seconds"] = time.perf_counter() - started
  report["published_at"] = time.time()
  if verify_recall:  # After the publish: a report, not a delay on the way to serving.
    started = time.perf_counter()
    report[f"recall_at_{k}_vs_exact_on_warmup_queries"] = warmup_recall(source.path, towers, index, state, k)
    timings["verify_seconds"] = time.perf_counter() - started
  report.update({name: round(seconds, 3) for name, seconds in timings.items()})
  return report


def rollback(base_path: str, version: int) -> dict[str, Any]:
  """Republishes an earlier version's files (hard-linked) as a new, newest version."""
  source_path = os.path.join(base_path, str(version))
  if version not in versions.list_versions(base_path):
    raise FileNotFoundError(f"No complete version {version} under {base_path} to roll back to")
  started = time.perf_counter()
  with versions.publish(base_path) as (temp_path, new_version):
    link_tree(source_path, temp_path, skip=(_REPORT_PATH,))
    report = read_report(source_path) if os.path.exists(os.path.join(source_path, _REPORT_PATH)) else {}
    report.update({"version": new_version, "path": os.path.join(base_path, str(new_version)), "kind": "rollback",
                   "refreshed_from": version})
    _write_report(temp_path, report)
  report["published_at"] = time.time()  # When servers can see it: after the rename.
  report["publish_seconds"] = round(time.perf_counter() - started, 3)
  return report


class Refresher:
  """Turns catalog deltas into new versions of one model base path.

  The towers of the first version it refreshes are loaded once and reused for every later version
  (they are the same towers), and the catalog state of the version it last published stays in
  memory; both are read again only when someone else publishes a version in between (a rollback,
  a new fgr-export).

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
    index_update: "auto" updates a ScaNN index from the source's training while few rows changed since
      it was trained, "full" always trains anew (see `rebuild_index`).
    retrain_fraction: with "auto", the share of the catalog encoded since the last training beyond which
      the index is trained anew.
    background_retrain: with "auto", train anew in a background thread (`refresh_retrain`) and keep
      publishing incremental updates meanwhile, instead of training on the publish path. For a
      resident refresher (`--watch`); the next rebuild (or `publish_retrained`) takes the new training.
  """

  def __init__(self, base_path: str, from_version: int | None = None, keep_versions: int | None = None,
               defer_prune: bool = False, index_overrides: dict[str, Any] | None = None, verify_recall: bool = True,
               index_update: str = "auto", retrain_fraction: float = DEFAULT_RETRAIN_FRACTION,
               background_retrain: bool = False):
    if keep_versions is not None and keep_versions < 1:
      raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
    if index_update not in INDEX_UPDATES:
      raise ValueError(f"index_update must be one of {INDEX_UPDATES}, got {index_update!r}")
    if not 0 <= retrain_fraction <= 1:
      raise ValueError(f"retrain_fraction must be in [0, 1], got {retrain_fraction}")
    self.base_path = base_path
    self.keep_versions = keep_versions
    self.defer_prune = defer_prune
    self._retired_source: Source | None = None  # With defer_prune: the previous catalog, freed later.
    self.index_overrides = dict(index_overrides or {})
    self.verify_recall = verify_recall
    self.index_update = index_update
    self.retrain_fraction = retrain_fraction
    self.background_retrain = background_retrain
    self._retrain: refresh_retrain.BackgroundRetrain | None = None
    self._from_version = from_version
    self._source: Source | None = None
    self._towers: LoadedTowers | None = None
    self._towers_version: int | None = None

  def source(self) -> Source:
    """The version the next refresh starts from (read again if another writer published since)."""
    on_disk = versions.list_versions(self.base_path)
    if not on_disk:
      raise FileNotFoundError(f"No version under {self.base_path} to refresh; run fgr-export first")
    wanted = self._from_version if self._from_version is not None else on_disk[-1]
    if self._source is None or self._source.version != wanted:
      self._source = Source.read(self.base_path, wanted)
    return self._source

  def prepare(self) -> None:
    """Reads the source version's catalog and loads its towers now rather than at the first delta."""
    self._towers_for(self.source())

  def _towers_for(self, source: Source) -> LoadedTowers:
    # Versions this refresher published share the towers it loaded; anything else is loaded anew.
    if self._towers is None or self._towers_version != source.version:
      _import_custom_ops(source.report)
      self._towers = LoadedTowers.load(source.path)
      self._towers_version = source.version
    return self._towers

  def apply(self, delta: refresh_delta.CatalogDelta) -> dict[str, Any]:
    """Publishes the catalog after `delta` as a new version; returns the refresh report."""
    self._prune_deferred()
    source = self.source()
    retrain = self._retrain_for(source)
    started = time.perf_counter()
    ignored_removals = {ad_id for ad_id in delta.removals if ad_id not in source.row_of}
    if delta.status_only or not (delta.upserts or delta.removals - ignored_removals):
      # Removing ads that are already gone (a delta applied twice) needs no rebuild either.
      delta.check_against(source.row_of)
      eligible = source.state.eligible.copy()
      for ad_id, status in delta.statuses.items():
        eligible[source.row_of[ad_id]] = status == "active"
      report = publish_status_only(self.base_path, source, eligible)
      report["delta"] = {"status_changes": len(delta.statuses), "ignored_removals": len(ignored_removals)}
      if retrain is not None:  # Same rows: the snapshot's map carries over.
        retrain.version = report["version"]
      return self._published(source, report, dataclasses.replace(source.state, eligible=eligible),
                             source.row_of, started)
    timings: dict[str, float] = {}
    towers = self._towers_for(source)
    timings["load_towers_seconds"] = time.perf_counter() - started
    step = time.perf_counter()
    state, counts, source_rows = apply_delta(source.state, source.row_of, delta, towers.embed_items)
    timings["embed_seconds"] = time.perf_counter() - step
    row_of = state.row_of()  # 1M Python objects at 1M ads: made before the publish, not while servers load it.
    report = self._publish_rebuild(source, towers, state, source_rows, retrain, timings)
    report["delta"] = counts
    return self._published(source, report, state, row_of, started)

  def publish_retrained(self) -> dict[str, Any] | None:
    """Publishes a finished background retrain over the newest catalog, with no delta; None if none is ready."""
    source = self.source()
    retrain = self._retrain_for(source)
    if retrain is None or not retrain.done:
      return None
    self._prune_deferred()
    started = time.perf_counter()
    towers = self._towers_for(source)
    report = self._publish_rebuild(source, towers, source.state, np.arange(len(source.state.ids)), retrain, {})
    report["delta"] = {}
    return self._published(source, report, source.state, source.row_of, started)

  def wait_for_retrain(self, timeout: float | None = None) -> bool:
    """Blocks until the background retrain (if any) is done; True when none is running any more."""
    return self._retrain is None or self._retrain.wait(timeout)

  def _retrain_for(self, source: Source) -> refresh_retrain.BackgroundRetrain | None:
    """The background retrain, if its row map still describes `source` (a rollback or export drops it)."""
    if self._retrain is not None and self._retrain.version != source.version:
      logging.info("Dropping the background retrain: version %d was published by someone else", source.version)
      self._retrain = None
    return self._retrain

  def _publish_rebuild(self, source: Source, towers: LoadedTowers, state: refresh_state.CatalogState,
                       source_rows: np.ndarray, retrain: refresh_retrain.BackgroundRetrain | None,
                       timings: dict[str, float]) -> dict[str, Any]:
    retrained, rows = None, None
    if retrain is not None:
      rows = retrain.rows_after(source_rows)
      if retrain.done:
        try:
          retrained = retrain.result(rows)
        except RuntimeError as e:
          logging.error("%s; updating version %d's index instead", e, source.version)
          self._retrain = retrain = None
    report = publish_rebuilt(self.base_path, source, towers, state, timings, self.index_overrides,
                             self.verify_recall, source_rows=source_rows, index_update=self.index_update,
                             retrain_fraction=self.retrain_fraction, retrained=retrained,
                             background=self.background_retrain)
    if retrained is not None:
      self._retrain = None
    elif retrain is not None:
      retrain.advance(rows, report["version"])
    config = report["index_config"]
    if (self.background_retrain and self._retrain is None and config.get("update") in ("incremental", "retrained")
        and config["rows_encoded_since_training"] > self.retrain_fraction * len(state.ids)):
      options = {"training_threads": 1, **report["index_options"]}  # Leave the other core to serving.
      self._retrain = refresh_retrain.BackgroundRetrain(state.embeddings, report["k"], options, report["version"])
      report["background_retrain_started"] = True
    return report

  def _published(self, source: Source, report: dict[str, Any], state: refresh_state.CatalogState,
                 row_of: dict[str, int], started: float) -> dict[str, Any]:
    report["total_seconds"] = round(time.perf_counter() - started, 3)
    # The new version is now the newest: remember its state and that it shares our towers.
    new_source = Source(report["version"], report["path"], report, state, row_of)
    if self._towers_version == source.version:
      self._towers_version = new_source.version
    self._source = new_source
    self._from_version = None
    if self.defer_prune:
      self._retired_source = source
    else:
      self.prune()
    logging.info("Published version %d (%s): %s", report["version"], report["kind"], report)
    return report

  def rollback(self, version: int) -> dict[str, Any]:
    self._prune_deferred()
    report = rollback(self.base_path, version)
    if not self.defer_prune:
      self.prune()
    logging.info("Rolled back to version %d as version %d", version, report["version"])
    return report

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
