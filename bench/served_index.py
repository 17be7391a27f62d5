"""An index search run as a model server runs it: SavedModel signatures called through a session."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2

from bench import capi_session
from engine import base


class ServedIndex:
  """An index search saved as SavedModel signatures and run as a model server runs them.

  TF Serving runs a SavedModel with C++ `Session::Run`. So every in-graph backend, exact search
  included, is timed the same way: the signatures are saved, loaded by TensorFlow's C API and called
  through `TF_SessionRun` (`bench/capi_session.py`), which adds about 25 us per call from Python.
  With `runner="python"` they run in a `tf.compat.v1.Session` through `make_callable` instead, as
  fgr-serve ran them before `serving/servables/direct_session.py` (about 70 us more per call; a profile).

  Two signatures are saved, as `FullGraph` saves them: `search(queries)` at the built defaults, like
  `serving_default`, and `search_with_options(queries, <search options>)` for knob sweeps.

  Args:
    index: the index to serve.
    k: neighbours per query.
    workdir: where the SavedModel is written (and deleted once loaded).
    config: the session's ConfigProto (fgr-serve's --tensorflow_session_config_file).
    runner: "capi" or "python".
  """

  def __init__(
    self, index: base.Index, k: int, workdir: str, config: config_pb2.ConfigProto | None = None, runner: str = "capi"
  ):
    if runner not in ("capi", "python"):
      raise ValueError(f"runner must be 'capi' or 'python', got {runner!r}")
    specs = index.search_option_specs()
    self._options = sorted(specs)
    module = tf.Module()
    module.index = index

    @tf.function
    def search(queries: tf.Tensor, **options: tf.Tensor) -> dict[str, tf.Tensor]:
      return {"indices": index.search(queries, k, **options).indices}

    queries_spec = tf.TensorSpec([None, None], tf.float32)
    signatures = {"search": search.get_concrete_function(queries=queries_spec)}
    if specs:
      signatures["search_with_options"] = search.get_concrete_function(queries=queries_spec, **specs)
    path = tempfile.mkdtemp(dir=workdir)
    try:
      tf.saved_model.save(
        module,
        path,
        signatures=signatures,
        options=tf.saved_model.SaveOptions(namespace_whitelist=index.save_namespaces() or None),
      )
      inputs = {name: ["queries", *(self._options if name != "search" else [])] for name in signatures}
      if runner == "capi":
        session = capi_session.CApiSession(path, config)
        self._call = {name: session.signature(name, names, "indices") for name, names in inputs.items()}
      else:
        self._call = self._load_python_session(path, config, inputs)
    finally:
      shutil.rmtree(path, ignore_errors=True)  # The session holds the restored variables.

  @staticmethod
  def _load_python_session(
    path: str, config: config_pb2.ConfigProto | None, inputs: dict[str, list[str]]
  ) -> dict[str, Callable[..., np.ndarray]]:
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph, config=config)
    with graph.as_default():
      meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
    calls = {}
    for name, names in inputs.items():
      signature_def = meta_graph.signature_def[name]
      calls[name] = session.make_callable(
        signature_def.outputs["indices"].name, [signature_def.inputs[i].name for i in names]
      )
    return calls

  def searcher(self, **options: int) -> Callable[[np.ndarray], np.ndarray]:
    """A search at the built defaults, or with the given options fed as int32 scalars (0: the default)."""
    unknown = set(options) - set(self._options)
    if unknown:
      raise ValueError(f"no search options {sorted(unknown)}; this index has {self._options}")
    if not options:
      return self._call["search"]
    values = [np.array(options.get(name, 0), np.int32) for name in self._options]
    run = self._call["search_with_options"]
    return lambda queries: run(queries, *values)
