"""The index interface shared by every backend, each backend's lifecycle spec, and the registry of them."""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
from absl import flags as absl_flags


class SearchResult(NamedTuple):
  """Top-k neighbours of a batch of queries, best first.

  scores: float32 [B, k]; -inf where fewer than k eligible items exist.
  indices: int32 [B, k] rows of the catalog; -1 where fewer than k eligible items exist.
  """

  scores: tf.Tensor
  indices: tf.Tensor


class Index(tf.Module):
  """A nearest-neighbour index that runs inside a TensorFlow graph.

  Two-tower retrieval factorises relevance into a dot product between a query embedding and an item
  embedding, so serving is a maximum-inner-product search over the catalog. An `Index` holds that
  catalog in the form its backend searches fastest, as tracked variables, so it is saved inside the
  same SavedModel as the towers and answers in the same graph call.

  Every index carries an `eligible` mask (one bool per catalog row): ineligible items (paused ads,
  filtered categories) never come back, and a search still returns k items when k eligible ones
  exist. Updating the mask is a variable assignment, so status changes need no rebuild.

  Across versions an index is rebuilt over a changed catalog (fgr-refresh). What the index knows
  about that lies here too, so the refresh needs no backend names: `config` (what to keep),
  `checkpoint_values` (which saved variables a new catalog replaces) and `graph_reuse_blocker`
  (whether serving functions traced for an earlier build can serve this one). What a backend's
  builder knows (tuned knobs, trained structure) lies in its `Backend`.

  Args:
    num_items: number of catalog rows.
    eligible: optional bool [num_items] mask; all items are eligible when omitted.
    name: module name.
  """

  # The resolved build configuration (knobs as given, derived and tuned), as reports show it and as a
  # rebuild starts from. Backends with knobs set their own dict; the rest share this empty, read-only one.
  config: Mapping[str, Any] = types.MappingProxyType({})

  def __init__(self, num_items: int, eligible: np.ndarray | None = None, name: str | None = None):
    super().__init__(name=name)
    if eligible is None:
      eligible = np.ones([num_items], dtype=bool)
    eligible = np.asarray(eligible, dtype=bool)
    if eligible.shape != (num_items,):
      raise ValueError(f"eligible must have shape [{num_items}], got {eligible.shape}")
    self._num_items = num_items
    self.eligible = catalog_variable(eligible, name="eligible")

  @property
  def num_items(self) -> int:
    return self._num_items

  def search(self, queries: tf.Tensor, k: int, **options: tf.Tensor) -> SearchResult:
    """Returns the k eligible items with the highest dot product with each query [B, d]."""
    raise NotImplementedError

  def search_option_specs(self) -> dict[str, tf.TensorSpec]:
    """Per-request search knobs (e.g. leaves to search) this backend accepts in `search`."""
    return {}

  def save_namespaces(self) -> list[str]:
    """Custom-op namespaces a SavedModel holding this index must whitelist."""
    return []

  def nbytes(self) -> int:
    """Bytes of index data (codes, vectors, partitions), excluding the eligibility mask."""
    raise NotImplementedError

  def checkpoint_values(self) -> dict[str, Any]:
    """The catalog-sized variables of this index by object path below it ("eligible", "state/dataset").

    A refresh that keeps an earlier version's graph writes these values into that graph's checkpoint,
    so they must be everything that changes with the catalog.
    """
    return {ELIGIBLE: self.eligible}

  def optional_checkpoint_paths(self) -> frozenset[str]:
    """Paths of `checkpoint_values` that a graph saved by an earlier build of this backend may lack."""
    return frozenset()

  def graph_reuse_blocker(self, saved_config: Mapping[str, Any], k: int, saved_num_items: int) -> str | None:
    """Why serving functions traced for an index built with `saved_config` cannot serve this one.

    None means they can: the graph reads everything that changed from `checkpoint_values`, and bakes in
    only what both builds share. By default the graph depends on the build.

    Args:
      saved_config: the `config` of the index the graph was traced for.
      k: the neighbours the graph asks for.
      saved_num_items: the catalog size the graph was traced for.
    """
    return "this backend's graph depends on its build"


# Object path, below the index, of the eligibility mask every index carries.
ELIGIBLE = "eligible"


def catalog_variable(value: np.ndarray | tf.Tensor, name: str) -> tf.Variable:
  """A non-trainable variable with one row per catalog item, saved with an unknown number of rows.

  A SavedModel then takes a catalog of any size in its checkpoint, so an index refresh can publish new
  rows under the previous version's graph (no re-tracing, and servers reuse the imported graph).
  """
  value = value if tf.is_tensor(value) else np.asarray(value)
  return tf.Variable(value, trainable=False, name=name, shape=tf.TensorShape([None, *value.shape[1:]]))


def string_array(values: Any) -> np.ndarray:
  """String ids or features (str or bytes) as an object array, which TensorFlow stores as UTF-8 tf.string.

  Not `astype(bytes)` or `astype(str)`: NumPy's fixed-width copies pad every value to the longest one
  (one long id costs its length times the catalog size) and encode and decode as ASCII only.
  """
  return np.asarray(values, dtype=object)


def decoded_strings(values: np.ndarray | tf.Tensor) -> np.ndarray:
  """tf.string values (UTF-8 bytes) as an object array of str of the same shape."""
  values = values.numpy() if tf.is_tensor(values) else np.asarray(values, dtype=object)
  decoded = np.empty(values.size, dtype=object)
  decoded[:] = [value.decode("utf-8") if isinstance(value, bytes) else value for value in values.ravel().tolist()]
  return decoded.reshape(values.shape)


def mask_ineligible(scores: tf.Tensor, eligible: tf.Tensor, candidate_rows: tf.Tensor | None = None) -> tf.Tensor:
  """Sets the scores of ineligible items to -inf.

  Args:
    scores: float [B, N] over the whole catalog, or [B, C] over `candidate_rows`.
    eligible: bool [num_items].
    candidate_rows: optional int [B, C] catalog rows that `scores` refer to (-1 means no item).
  """
  if candidate_rows is None:
    keep = tf.broadcast_to(eligible[tf.newaxis, :], tf.shape(scores))
  else:
    safe_rows = tf.maximum(candidate_rows, 0)
    # Gathering from the read value (GatherV2) rather than the variable (ResourceGather, which locks it)
    # is faster per single-query search (docs/history/benchmarks-2026-11.md, Index backends).
    keep = tf.logical_and(tf.gather(tf.convert_to_tensor(eligible), safe_rows), candidate_rows >= 0)
  return tf.where(keep, scores, tf.constant(-np.inf, scores.dtype))


def finalize(scores: tf.Tensor, indices: tf.Tensor) -> SearchResult:
  """Casts to the result dtypes and marks -inf slots (no eligible item) with index -1."""
  scores = tf.cast(scores, tf.float32)
  indices = tf.cast(indices, tf.int32)
  indices = tf.where(tf.math.is_finite(scores), indices, tf.constant(-1, tf.int32))
  return SearchResult(scores=scores, indices=indices)


# The arguments every builder takes from the caller rather than from its options.
_BUILD_ARGUMENTS = frozenset({"embeddings", "k", "eligible", "tuning_queries"})


class Backend:
  """One backend: how it builds an index, and what a rebuild over a changed catalog may keep of one.

  ScaNN-style, choosing the backend is separate from the algorithm: fgr-refresh asks these questions
  of whatever backend built a version, and never names one. The base class answers for backends
  without an incremental update: a rebuild keeps the options, trains anew, and reuses nothing.

  Args:
    name: the registry name (`--index`).
    build: builder(embeddings, *, k, eligible, tuning_queries, **options) -> Index.
  """

  # Whether `update` can build an index over a changed catalog from an earlier build's training.
  updatable: bool = False

  def __init__(self, name: str, build: Callable[..., Index], check: Callable[..., Any] | None = None):
    """Args:
    name: the backend's name (--index).
    build: the builder `build` calls.
    check: optional `check(num_items, k, **options)`, raising ValueError for a value `build` would
      refuse; it gets every option of the builder, its defaults filled in (`check_values`).
    """
    self.name = name
    self._build = build
    self._check = check

  def build(
    self,
    embeddings: np.ndarray,
    *,
    k: int,
    eligible: np.ndarray | None = None,
    tuning_queries: np.ndarray | None = None,
    **options: Any,
  ) -> Index:
    return self._build(embeddings, k=k, eligible=eligible, tuning_queries=tuning_queries, **self._switches(options))

  def _switches(self, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with every on/off option of the builder (annotated `bool`) as a bool.

    `--index_options` parses `true`/`false` to bools, but the reports of versions exported before it
    did so hold the strings, and a non-empty string is truthy: `jit_compile="false"` would turn XLA
    on. So what absl takes for a boolean flag ("true", "f", "0", ... and the integers 0 and 1) becomes
    a bool here, and any other value is refused.
    """
    parameters = inspect.signature(self._build).parameters
    out = dict(options)
    for name, value in options.items():
      if name not in parameters or parameters[name].annotation not in (bool, "bool"):
        continue
      refused = ValueError(f"{self.name} option {name} must be true or false, got {value!r}")
      if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        out[name] = bool(value)
      elif isinstance(value, str):
        try:
          out[name] = absl_flags.BooleanParser().parse(value)
        except ValueError:
          raise refused from None
      else:
        raise refused
    return out

  def takes(self, option: str) -> bool:
    """Whether the backend's build takes `option`."""
    return option in inspect.signature(self._build).parameters and option not in _BUILD_ARGUMENTS

  def check_options(self, options: Mapping[str, Any]) -> None:
    """Raises ValueError naming the options this backend's build does not take (e.g. a typo).

    Checked before anything is built or published: fgr-refresh keeps its overrides in every version's
    report, so a bad one would break each later rebuild.
    """
    parameters = inspect.signature(self._build).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
      return  # The builder checks its own options.
    known = set(parameters) - _BUILD_ARGUMENTS
    unknown = set(options) - known
    if unknown:
      raise ValueError(f"Unknown {self.name} options {sorted(unknown)}; known: {sorted(known)}")

  def check_values(self, options: Mapping[str, Any], k: int, num_items: int) -> None:
    """Raises ValueError naming the first option no build of `num_items` ads searched for `k` accepts.

    For fgr-export, once the catalog's size is known and before it is embedded (minutes at 1M ads).
    The names, then the values, through the backend's `check` when it has one.
    """
    self.check_options(options)
    options = self._switches(options)
    if self._check is not None:
      bound = inspect.signature(self._build).bind_partial(**options)
      bound.apply_defaults()
      self._check(num_items, k, **{n: v for n, v in bound.arguments.items() if n not in _BUILD_ARGUMENTS})

  def check_update_values(self, options: Mapping[str, Any], config: Mapping[str, Any], k: int, num_items: int) -> None:
    """`check_values` for an `update` of an index built with `config` to `num_items` rows.

    An update trains and tunes nothing, so no build checks the search knobs it takes from `options`
    (a refresher's overrides, kept in every later version).
    """
    del config
    self.check_values(options, k, num_items)

  def load_ops(self) -> None:
    """Registers the custom ops a SavedModel holding this backend's index needs, before it is loaded."""

  def rebuild_options(
    self,
    options: Mapping[str, Any],
    config: Mapping[str, Any],
    k: int,
    overrides: Mapping[str, Any] | None = None,
  ) -> dict[str, Any]:
    """The options that rebuild an index the way `options` built one whose `config` is given.

    A rebuild keeps the knobs its build tuned: the catalog changed a little, and tuning again would cost
    more than the rest of the build. `overrides` (a refresher's) replace options.
    """
    del config, k
    return {**options, **(overrides or {})}

  def structure_changes(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> list[str]:
    """Options that change what a build trains or stores, set in `options` to other values than `config`'s."""
    del config, options
    return []

  def background_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` for a build in a background thread, leaving the other cores to serving."""
    return dict(options)

  def trained(self, index: Index) -> Any:
    """What `update` reuses of a built index (its trained structure)."""
    raise NotImplementedError(f"the {self.name} backend has no incremental update")

  def read_trained(self, checkpoint_prefix: str, index_path: str, embeddings: np.ndarray) -> Any:
    """What `update` reuses of the index saved at object path `index_path` of a checkpoint.

    Args:
      checkpoint_prefix: a TF checkpoint (e.g. a SavedModel's variables/variables).
      index_path: the index's object path in it.
      embeddings: float32 [N, d], the rows the index was built over.

    Raises:
      KeyError, ValueError: the checkpoint holds no updatable index of this backend.
    """
    del checkpoint_prefix, index_path, embeddings
    raise NotImplementedError(f"the {self.name} backend has no incremental update")

  def update(
    self,
    trained: Any,
    config: Mapping[str, Any],
    embeddings: np.ndarray,
    source_rows: np.ndarray,
    eligible: np.ndarray,
    options: Mapping[str, Any],
  ) -> Index:
    """An index over `embeddings` from an earlier build's training (no training, no tuning).

    Args:
      trained: from `trained` or `read_trained`.
      config: the earlier build's config, with the caller's bookkeeping.
      embeddings: float32 [N', d], every row of the new catalog.
      source_rows: int64 [N']: the row of the trained index holding new row i unchanged, or -1.
      eligible: bool [N'] mask.
      options: the rebuild's options; search-time knobs among them replace the config's.

    Raises:
      KeyError, ValueError: `trained` cannot be updated.
    """
    del trained, config, embeddings, source_rows, eligible, options
    raise NotImplementedError(f"the {self.name} backend has no incremental update")


# Backends register lazily as "module" holding a `BACKEND`, so that building a stock-op index never
# imports ScaNN (whose custom ops would otherwise end up required by every SavedModel we write).
_BACKENDS: dict[str, str] = {
  "brute_force": "engine.brute_force",
  "scann": "engine.scann_backend",
  "int8": "engine.int8_index",
  "binary": "engine.binary_index",
  "partitioned": "engine.partitioned_index",
}
DEFAULT_BACKEND = "scann"


def available_backends() -> list[str]:
  return sorted(_BACKENDS)


def backend(name: str) -> Backend:
  """The named backend (see `available_backends()`)."""
  if name not in _BACKENDS:
    raise ValueError(f"Unknown index backend {name!r}; choose one of {available_backends()}")
  return importlib.import_module(_BACKENDS[name]).BACKEND


def build_index(
  backend_name: str,
  embeddings: np.ndarray,
  *,
  k: int,
  eligible: np.ndarray | None = None,
  tuning_queries: np.ndarray | None = None,
  **options: Any,
) -> Index:
  """Builds the named backend over float32 item embeddings [N, d].

  Args:
    backend_name: one of `available_backends()`.
    embeddings: float32 [N, d] item embeddings, one row per catalog item; all finite.
    k: the largest number of neighbours a search will ask for, 1 to N.
    eligible: optional bool [N] mask of items that may be returned.
    tuning_queries: optional float32 [Q, d] held-out query embeddings. Backends that tune search knobs
      for a target recall tune on these; without them they fall back to catalog points, which can
      sit far from where real queries land and so overstate recall.
    **options: backend-specific configuration.
  """
  spec = backend(backend_name)
  embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
  if embeddings.ndim != 2 or embeddings.shape[0] == 0:
    raise ValueError(f"embeddings must be a non-empty [N, d] matrix, got shape {embeddings.shape}")
  check_k(k, embeddings.shape[0])  # Every backend, before it trains or tunes (not a TopKV2 message later).
  check_finite_embeddings(embeddings)
  return spec.build(embeddings, k=k, eligible=eligible, tuning_queries=tuning_queries, **options)


def check_finite_embeddings(embeddings: np.ndarray, ids: Sequence[str] | None = None, chunk: int = 1 << 16) -> None:
  """Raises ValueError naming the first item embeddings [N, d] that hold a NaN or an infinity.

  No backend can rank such a row: exact search puts it first as an empty slot (NaN sorts ahead of every
  score), and int8 quantisation loses every scale to it. Every index build and every row a refresh adds
  passes here. Checked in chunks, so a memory-mapped catalog is not read into memory at once.

  Args:
    embeddings: float [N, d].
    ids: optional [N] ad ids, named instead of row numbers.
    chunk: rows checked at a time.
  """
  bad = np.concatenate(
    [
      start + np.flatnonzero(~np.isfinite(embeddings[start : start + chunk]).all(axis=1))
      for start in range(0, embeddings.shape[0], chunk)
    ]
    or [np.zeros([0], np.int64)]
  )
  if bad.size:
    first = ", ".join(repr(ids[row]) for row in bad[:5]) if ids is not None else ", ".join(map(str, bad[:5]))
    raise ValueError(
      f"item embeddings must be finite: {bad.size} of {embeddings.shape[0]} hold NaN or infinity "
      f"({'ads' if ids is not None else 'rows'} {first}{', ...' if bad.size > 5 else ''}); check the item tower"
    )


def check_option(
  name: str, value: Any, low: float, high: float | None = None, *, integer: bool = True, valid: str = ""
) -> None:
  """Raises ValueError naming build option `name` unless it is a number (an int if `integer`) in [low, high].

  Options reach builds as parsed literals (`--index_options`, a version's report), so a float, a bool or a
  string can stand where a count belongs. `valid` says what the option accepts instead of the plain range
  (e.g. "0 (tuned) or 1 to 40, the number of partitions").
  """
  kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  # NaN fails `low <= value`, so it is refused with the out-of-range values.
  if isinstance(value, bool) or not isinstance(value, kinds) or not (low <= value and (high is None or value <= high)):
    if not valid:
      valid = f"{'an integer' if integer else 'a number'} " + (
        f"in [{low}, {high}]" if high is not None else f"of at least {low}"
      )
    raise ValueError(f"{name} must be {valid}, got {value!r}")


def check_k(k: int, num_items: int) -> None:
  """Refuses a number of neighbours no search of a `num_items` catalog can return."""
  if not 0 < k <= num_items:
    raise ValueError(f"k must be in [1, {num_items}] (the catalog size), got {k}")
