"""hnswlib and Faiss on the same vectors, as out-of-graph baselines (optional `bench` extras)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

Search = Callable[[np.ndarray], np.ndarray]

_MODULES = {"hnswlib": "hnswlib", "faiss_ivfpq": "faiss", "faiss_hnsw": "faiss"}


def available(name: str) -> bool:
  """Whether the library behind `name` is installed."""
  if name not in _MODULES:
    raise ValueError(f"unknown extra {name!r}; choose from {sorted(_MODULES)}")
  return importlib.util.find_spec(_MODULES[name]) is not None


class Library:
  """A built library index: its size and a sweep of (setting, single search, batched search).

  Each search function applies its own setting on every call, so settings can be timed interleaved.
  """

  nbytes: int = 0

  def settings(self) -> Iterator[tuple[str, Search, Search]]:
    raise NotImplementedError


class Hnswlib(Library):
  """hnswlib HNSW graph, inner-product space, M=32, ef_construction=200; sweeps ef.

  Single queries run on one thread (as one serving request would), batches on every core.
  """

  def __init__(self, items: np.ndarray, k: int, m: int = 32, ef_construction: int = 200):
    import hnswlib  # pylint: disable=g-import-not-at-top

    self._k = k
    self._index = hnswlib.Index(space="ip", dim=items.shape[1])
    self._index.init_index(max_elements=items.shape[0], ef_construction=ef_construction, M=m)
    self._index.add_items(items, np.arange(items.shape[0]), num_threads=-1)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "hnsw.bin")
      self._index.save_index(path)
      self.nbytes = os.path.getsize(path)

  def _search(self, ef: int, threads: int) -> Search:
    def search(queries: np.ndarray) -> np.ndarray:
      self._index.set_ef(ef)
      return self._index.knn_query(queries, k=self._k, num_threads=threads)[0]

    return search

  def settings(self) -> Iterator[tuple[str, Search, Search]]:
    for ef in (100, 120, 130, 140, 150, 200, 300, 400, 600):
      if ef >= self._k:
        yield f"ef={ef}", self._search(ef, 1), self._search(ef, -1)


class Faiss(Library):
  """A Faiss index from a factory string, inner product; sweeps nprobe (IVF) or efSearch (HNSW)."""

  def __init__(self, items: np.ndarray, k: int, factory: str, knobs: list[str]):
    import faiss  # pylint: disable=g-import-not-at-top

    self._faiss = faiss
    self._k = k
    self._knobs = knobs
    self._index = faiss.index_factory(items.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    self._index.train(items)
    self._index.add(items)
    self.nbytes = int(faiss.serialize_index(self._index).nbytes)

  def _search(self, knob: str, threads: int) -> Search:
    space = self._faiss.ParameterSpace()

    def search(queries: np.ndarray) -> np.ndarray:
      space.set_index_parameters(self._index, knob)
      self._faiss.omp_set_num_threads(threads)
      return self._index.search(np.ascontiguousarray(queries), self._k)[1]

    return search

  def settings(self) -> Iterator[tuple[str, Search, Search]]:
    for knob in self._knobs:
      yield knob, self._search(knob, 1), self._search(knob, os.cpu_count() or 1)


def build(name: str, items: np.ndarray, k: int) -> Library:
  """Builds the named library index over `items`."""
  if name == "hnswlib":
    return Hnswlib(items, k)
  num_lists = max(16, int(4 * np.sqrt(items.shape[0])))
  if name == "faiss_ivfpq":
    # IVF + 4-bit fast-scan PQ (16 bytes per vector) + exact refine: Faiss's analogue of ScaNN's tree + AH + reorder.
    knobs = [f"nprobe={p},k_factor_rf={r}" for p in (8, 16, 32, 64, 128) for r in (4,)]
    return Faiss(items, k, f"IVF{num_lists},PQ{items.shape[1] // 2}x4fs,RFlat", knobs)
  if name == "faiss_hnsw":
    return Faiss(items, k, "HNSW32,Flat", [f"efSearch={ef}" for ef in (100, 150, 200, 300, 400)])
  raise ValueError(f"unknown extra {name!r}")
