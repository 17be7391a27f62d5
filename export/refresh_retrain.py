"""Retraining a refreshed index in the background, off the publish path.

Incremental updates (`engine.base.Backend.update`) keep version N's training. Once enough of the
catalog has been encoded since that training, a continuous refresher starts a full build over a
snapshot of its catalog in a thread, and keeps publishing incremental updates meanwhile. Every later
rebuild maps its catalog's rows back to the snapshot's (`follow`), so when the build is done, the
next version takes the new training and encodes only the rows changed since the snapshot.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from absl import logging

from engine import base
from export import refresh_policy


class BackgroundRetrain:
  """A full index build over a snapshot of the catalog, running in a thread.

  Updatable backends train inside TF ops, which release the GIL, so the refresher keeps publishing
  while the index trains.

  Args:
    backend: the index backend (an updatable one).
    embeddings: float32 [N, d], the snapshot's rows (copied).
    k: the index's default number of neighbours.
    options: the backend's build options (the version's, with its tuned search knobs, so nothing is
      tuned); `Backend.background_options` adapts them to a build beside serving.
    version: the version whose catalog is the snapshot.

  Attributes:
    version: the latest version whose catalog's rows are mapped to the snapshot's.
    snapshot: the version the snapshot was taken from.
  """

  def __init__(self, backend: str, embeddings: np.ndarray, k: int, options: dict[str, Any], version: int):
    self._backend = base.backend(backend)
    self.version = version
    self.snapshot = version
    self._embeddings = np.array(embeddings, dtype=np.float32, copy=True)
    self._rows = np.arange(len(embeddings), dtype=np.int64)
    self._index: base.Index | None = None
    self._error: Exception | None = None
    self.started = time.perf_counter()
    self.seconds: float | None = None
    options = self._backend.background_options(options)
    self._thread = threading.Thread(target=self._train, args=(k, options), name="index-retrain", daemon=True)
    self._thread.start()
    logging.info(
      "Retraining the %s index in the background over version %d's %d rows", backend, version, len(embeddings)
    )

  def _train(self, k: int, options: dict[str, Any]) -> None:
    try:
      self._index = self._backend.build(self._embeddings, k=k, **options)
    except Exception as e:  # pylint: disable=broad-except  Reported by `result`.
      self._error = e
    self.seconds = time.perf_counter() - self.started

  @property
  def done(self) -> bool:
    return not self._thread.is_alive()

  def wait(self, timeout: float | None = None) -> bool:
    """Blocks until the build is done (or `timeout` seconds pass); True when done."""
    self._thread.join(timeout)
    return self.done

  def rows_after(self, source_rows: np.ndarray) -> np.ndarray:
    """The snapshot row of each row of a catalog rebuilt from the latest one (-1: new or changed since).

    Args:
      source_rows: the rebuild's row map: row i copies the latest catalog's row source_rows[i], or -1.
    """
    source_rows = np.asarray(source_rows, dtype=np.int64)
    return np.where(source_rows >= 0, self._rows[np.maximum(source_rows, 0)], -1)

  def advance(self, rows: np.ndarray, version: int) -> None:
    """Records that `version` was published with `rows` (from `rows_after`) as its catalog's map."""
    self._rows, self.version = rows, version

  def result(self, rows: np.ndarray) -> refresh_policy.Retrained:
    """The build's training, to update onto the catalog `rows` (from `rows_after`) maps."""
    if not self.done:
      raise RuntimeError("the background index build is still running")
    if self._error is not None or self._index is None:
      raise RuntimeError(f"the background index build failed: {self._error}") from self._error
    config = dict(self._index.config, retrain_seconds=round(self.seconds or 0.0, 3), retrained_from=self.snapshot)
    return refresh_policy.Retrained(self._backend.trained(self._index), rows, config)
