"""fgr-serve's native data plane (`_fgr_native`, C++): loaded once, apart from TensorFlow's protobuf.

`module()` returns the extension or None; `unavailable_reason()` says why it is None. The first call
imports TensorFlow, then the extension with RTLD_LOCAL | RTLD_DEEPBIND, so that the extension and
its libprotobuf and libgrpc++ bind to their own symbols and never to the copies TensorFlow's
libraries export process-wide (serving/native/README.md), then hands it TensorFlow's library folder
(`init`). Build it with `make install` (or `python -m serving.native.build`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import types

_lock = threading.Lock()
_loaded = False
_module: types.ModuleType | None = None
_reason = ""


def _load() -> tuple[types.ModuleType | None, str]:
  import tensorflow as tf  # First: its libraries must be loaded (RTLD_GLOBAL) before the module binds.

  name = f"{__name__}._fgr_native"
  if importlib.util.find_spec(name) is None:
    if not os.path.isdir(os.path.join(os.path.dirname(__file__), "cc")):
      # An install from a checkout where it was not built: the build needs the checkout's sources.
      return None, "not built: build it in the checkout (`make install`), then install from there"
    return None, "not built: run `make install` (or `python -m serving.native.build`)"
  flags = sys.getdlopenflags()
  sys.setdlopenflags(os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
  try:
    native = importlib.import_module(name)
  except ImportError as e:
    return None, f"cannot load {name}: {e}"
  finally:
    sys.setdlopenflags(flags)
  if hasattr(native, "init"):
    try:
      native.init(os.path.dirname(tf.__file__))
    except Exception as e:  # noqa: BLE001  # Any failure means the Python path serves.
      return None, f"{name}.init failed: {e}"
  return native, ""


def module() -> types.ModuleType | None:
  """The loaded `_fgr_native` extension, or None when it is not built or does not load."""
  global _loaded, _module, _reason
  if not _loaded:
    with _lock:
      if not _loaded:
        _module, _reason = _load()
        _loaded = True
  return _module


def unavailable_reason() -> str:
  """Why `module()` is None ("" when it is not)."""
  module()
  return _reason
