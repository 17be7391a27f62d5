"""A SavedModel signature run through TensorFlow's C API, the C++ `Session::Run` TF Serving calls.

`tf.compat.v1.Session` adds about 70 us of Python work to every call (feed conversion, fetch
wrapping), which is a fifth of a ScaNN search at 1M items and none of what a C++ model server pays.
This calls TensorFlow's public C API (`TF_LoadSessionFromSavedModel`, `TF_SessionRun`, shipped in the
`tensorflow` wheel's shared libraries) through ctypes, so that fgr-bench times every in-graph backend
as a C++ server runs it. It is a measuring tool for numeric signatures, not a serving path: fgr-serve
reaches `TF_SessionRun` through the private bindings `tf.compat.v1.Session` itself uses
(`serving/servables/direct_session.py`).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2

_LIB_DIR = os.path.dirname(tf.__file__)
# Both libraries are already loaded by `import tensorflow`; these handles reuse that copy, so ops
# registered since (ScaNN's) are visible to sessions made here.
_CC = ctypes.CDLL(os.path.join(_LIB_DIR, "libtensorflow_cc.so.2"))
_FRAMEWORK = ctypes.CDLL(os.path.join(_LIB_DIR, "libtensorflow_framework.so.2"))

_DTYPES = {tf.float32: (1, np.float32), tf.int32: (3, np.int32), tf.int64: (9, np.int64)}  # TF_DataType codes.


class _Output(ctypes.Structure):
  _fields_ = [("oper", ctypes.c_void_p), ("index", ctypes.c_int)]


class _Buffer(ctypes.Structure):
  _fields_ = [("data", ctypes.c_void_p), ("length", ctypes.c_size_t), ("data_deallocator", ctypes.c_void_p)]


def _declare(lib: ctypes.CDLL, name: str, restype, *argtypes) -> None:
  function = getattr(lib, name)
  function.restype = restype
  function.argtypes = list(argtypes)


_P = ctypes.c_void_p
_declare(_FRAMEWORK, "TF_NewStatus", _P)
_declare(_FRAMEWORK, "TF_DeleteStatus", None, _P)
_declare(_FRAMEWORK, "TF_GetCode", ctypes.c_int, _P)
_declare(_FRAMEWORK, "TF_Message", ctypes.c_char_p, _P)
_declare(_FRAMEWORK, "TF_NewBuffer", ctypes.POINTER(_Buffer))
_declare(_FRAMEWORK, "TF_DeleteBuffer", None, ctypes.POINTER(_Buffer))
_declare(
  _FRAMEWORK, "TF_AllocateTensor", _P, ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_size_t
)
_declare(_FRAMEWORK, "TF_DeleteTensor", None, _P)
_declare(_FRAMEWORK, "TF_TensorData", _P, _P)
_declare(_FRAMEWORK, "TF_TensorByteSize", ctypes.c_size_t, _P)
_declare(_FRAMEWORK, "TF_NumDims", ctypes.c_int, _P)
_declare(_FRAMEWORK, "TF_Dim", ctypes.c_int64, _P, ctypes.c_int)
_declare(_CC, "TF_NewSessionOptions", _P)
_declare(_CC, "TF_DeleteSessionOptions", None, _P)
_declare(_CC, "TF_SetConfig", None, _P, ctypes.c_char_p, ctypes.c_size_t, _P)
_declare(_CC, "TF_NewGraph", _P)
_declare(_CC, "TF_DeleteGraph", None, _P)
_declare(_CC, "TF_GraphOperationByName", _P, _P, ctypes.c_char_p)
_declare(
  _CC,
  "TF_LoadSessionFromSavedModel",
  _P,
  _P,
  _P,
  ctypes.c_char_p,
  ctypes.POINTER(ctypes.c_char_p),
  ctypes.c_int,
  _P,
  ctypes.POINTER(_Buffer),
  _P,
)
_declare(_CC, "TF_CloseSession", None, _P, _P)
_declare(_CC, "TF_DeleteSession", None, _P, _P)
_declare(
  _CC,
  "TF_SessionRun",
  None,
  _P,
  _P,
  ctypes.POINTER(_Output),
  ctypes.POINTER(_P),
  ctypes.c_int,
  ctypes.POINTER(_Output),
  ctypes.POINTER(_P),
  ctypes.c_int,
  _P,
  ctypes.c_int,
  _P,
  _P,
)


def _check(status: int) -> None:
  if _FRAMEWORK.TF_GetCode(status) != 0:
    raise RuntimeError(_FRAMEWORK.TF_Message(status).decode("utf-8", "replace"))


class CApiSession:
  """A SavedModel loaded by the C API, as TF Serving's C++ loader loads it.

  Args:
    export_dir: the SavedModel directory.
    config: the session's ConfigProto.
  """

  def __init__(self, export_dir: str, config: config_pb2.ConfigProto | None = None):
    self._status = _FRAMEWORK.TF_NewStatus()
    self._graph = _CC.TF_NewGraph()
    options = _CC.TF_NewSessionOptions()
    meta_graph_buffer = _FRAMEWORK.TF_NewBuffer()
    tags = (ctypes.c_char_p * 1)(b"serve")
    try:
      serialized = (config or config_pb2.ConfigProto()).SerializeToString()
      _CC.TF_SetConfig(options, serialized, len(serialized), self._status)
      _check(self._status)
      self._session = _CC.TF_LoadSessionFromSavedModel(
        options, None, export_dir.encode(), tags, 1, self._graph, meta_graph_buffer, self._status
      )
      _check(self._status)
      self.meta_graph = meta_graph_pb2.MetaGraphDef.FromString(
        ctypes.string_at(meta_graph_buffer.contents.data, meta_graph_buffer.contents.length)
      )
    finally:
      _FRAMEWORK.TF_DeleteBuffer(meta_graph_buffer)
      _CC.TF_DeleteSessionOptions(options)

  def signature(self, name: str, inputs: Sequence[str], output: str) -> CApiSignature:
    """A callable running signature `name` on `inputs` (in that order) and returning `output`."""
    signature_def = self.meta_graph.signature_def[name]
    unknown = (set(inputs) - set(signature_def.inputs)) | ({output} - set(signature_def.outputs))
    if unknown:
      raise ValueError(f"signature {name} has no {sorted(unknown)}")
    return CApiSignature(self, [signature_def.inputs[n] for n in inputs], signature_def.outputs[output])

  def operation(self, tensor_name: str) -> _Output:
    """The TF_Output of a graph tensor named "op:index"."""
    op_name, index = tensor_name.split(":")
    operation = _CC.TF_GraphOperationByName(self._graph, op_name.encode())
    if not operation:
      raise ValueError(f"no operation {op_name} in the loaded graph")
    return _Output(operation, int(index))

  def run(
    self, inputs: ctypes.Array, input_values: ctypes.Array, fetches: ctypes.Array, fetch_values: ctypes.Array
  ) -> None:
    """TF_SessionRun over prepared C arrays; raises on a non-OK status."""
    if not self._session:
      raise RuntimeError("the session is closed")
    _CC.TF_SessionRun(
      self._session,
      None,
      inputs,
      input_values,
      len(inputs),
      fetches,
      fetch_values,
      len(fetches),
      None,
      0,
      None,
      self._status,
    )
    _check(self._status)

  def close(self) -> None:
    """Closes and frees the session (and its restored variables); safe to call twice."""
    if getattr(self, "_session", None):
      _CC.TF_CloseSession(self._session, self._status)
      _CC.TF_DeleteSession(self._session, self._status)
    self._session = None
    if getattr(self, "_graph", None):
      _CC.TF_DeleteGraph(self._graph)
      self._graph = None
    if getattr(self, "_status", None):
      _FRAMEWORK.TF_DeleteStatus(self._status)
      self._status = None

  def __del__(self):
    self.close()


class CApiSignature:
  """Calls one signature of a `CApiSession` with NumPy arrays (one call at a time: buffers are reused)."""

  def __init__(
    self, session: CApiSession, inputs: Sequence[meta_graph_pb2.TensorInfo], output: meta_graph_pb2.TensorInfo
  ):
    self._session = session  # Kept alive as long as the callable.
    unsupported = [info.name for info in [*inputs, output] if tf.as_dtype(info.dtype) not in _DTYPES]
    if unsupported:
      raise ValueError(f"{unsupported}: only {sorted(d.name for d in _DTYPES)} tensors are supported")
    self._inputs = (_Output * len(inputs))(*[session.operation(info.name) for info in inputs])
    self._input_dtypes = [_DTYPES[tf.as_dtype(info.dtype)] for info in inputs]
    self._fetch = (_Output * 1)(session.operation(output.name))
    self._output_dtype = _DTYPES[tf.as_dtype(output.dtype)][1]
    self._input_values = (_P * len(inputs))()
    self._output_values = (_P * 1)()

  def __call__(self, *values: np.ndarray) -> np.ndarray:
    """Runs the signature on `values` (one array per input) and returns a copy of the output."""
    if len(values) != len(self._inputs):
      raise ValueError(f"expected {len(self._inputs)} inputs, got {len(values)}")
    try:
      for i, (value, (code, dtype)) in enumerate(zip(values, self._input_dtypes)):
        value = np.ascontiguousarray(value, dtype=dtype)
        dims = (ctypes.c_int64 * value.ndim)(*value.shape)
        tensor = _FRAMEWORK.TF_AllocateTensor(code, dims, value.ndim, value.nbytes)
        ctypes.memmove(_FRAMEWORK.TF_TensorData(tensor), value.ctypes.data, value.nbytes)
        self._input_values[i] = tensor
      self._session.run(self._inputs, self._input_values, self._fetch, self._output_values)
      result = self._output_values[0]
      shape = [_FRAMEWORK.TF_Dim(result, d) for d in range(_FRAMEWORK.TF_NumDims(result))]
      size = _FRAMEWORK.TF_TensorByteSize(result)
      array = np.frombuffer(ctypes.string_at(_FRAMEWORK.TF_TensorData(result), size), self._output_dtype)
      _FRAMEWORK.TF_DeleteTensor(result)
      self._output_values[0] = None
      return array.reshape(shape)
    finally:
      for i in range(len(values)):
        if self._input_values[i]:
          _FRAMEWORK.TF_DeleteTensor(self._input_values[i])
          self._input_values[i] = None
