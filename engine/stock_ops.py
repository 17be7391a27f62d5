"""Checks that a SavedModel runs on stock TF: no custom op (loaded in a fresh process without ScaNN), and what needs XLA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def read_saved_model(saved_model_dir: str) -> Any:
  """The SavedModel proto of a directory's saved_model.pb.

  Raises:
    ValueError: naming the file, when it does not parse or holds no MetaGraph (damaged, or cut short:
      protobuf's DecodeError named neither, and an empty file parsed as a SavedModel of nothing).
  """
  from google.protobuf import message  # pylint: disable=g-import-not-at-top
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top

  path = os.path.join(saved_model_dir, "saved_model.pb")
  saved_model = saved_model_pb2.SavedModel()
  with open(path, "rb") as f:
    try:
      saved_model.ParseFromString(f.read())
    except message.DecodeError as e:
      raise ValueError(f"{path} does not parse as a SavedModel ({e}): the version is damaged or incomplete") from None
  if not saved_model.meta_graphs:
    raise ValueError(f"{path} holds no MetaGraph: the version is damaged or incomplete")
  return saved_model


def custom_ops(saved_model_dir: str) -> list[str]:
  """Op types in the SavedModel's graph and functions that this process's TensorFlow lacks."""
  from tensorflow.python.framework import op_def_registry  # pylint: disable=g-import-not-at-top

  saved_model = read_saved_model(saved_model_dir)
  ops = set()
  for meta_graph in saved_model.meta_graphs:
    ops.update(node.op for node in meta_graph.graph_def.node)
    for function in meta_graph.graph_def.library.function:
      ops.update(node.op for node in function.node_def)
    functions = {f.signature.name for f in meta_graph.graph_def.library.function}
    ops -= functions  # Calls to library functions appear as ops named after the function.
  return sorted(op for op in ops if op_def_registry.get(op) is None)


def xla_compiled_functions(saved_model_dir: str) -> list[str]:
  """Functions in the SavedModel that must be XLA-compiled (`jit_compile=True`).

  Stock TF Serving disables XLA on CPU unless started with `--xla_cpu_compilation_enabled=true`, and
  then fails any call of them, warm-up included, so such a version never loads there.
  """
  names = set()
  for meta_graph in read_saved_model(saved_model_dir).meta_graphs:
    for function in meta_graph.graph_def.library.function:
      attr = function.attr.get("_XlaMustCompile")
      if attr is not None and attr.b:
        names.add(function.signature.name)
  return sorted(names)


def load_in_fresh_process(saved_model_dir: str, timeout: float = 300.0) -> dict[str, Any]:
  """Loads the SavedModel in a new Python process that never imports ScaNN.

  Returns:
    {"custom_ops": [...op types stock TF lacks...], "xla_functions": [...functions that need XLA
     (`xla_compiled_functions`)...], "loaded": bool, "ran": bool (every signature ran
     once on zero inputs), "scann_imported": bool, "signatures": [...], "error": str}.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  completed = subprocess.run(
    [sys.executable, "-m", "engine.stock_ops", saved_model_dir],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
    cwd=root,
    check=False,
  )
  lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
  if completed.returncode != 0 or not lines:
    return {
      "custom_ops": [],
      "xla_functions": [],
      "loaded": False,
      "ran": False,
      "scann_imported": False,
      "signatures": [],
      "error": completed.stderr[-2000:],
    }
  return json.loads(lines[-1])


def _main(argv: list[str]) -> None:
  """Prints the JSON report of the one SavedModel directory named on the command line."""
  from absl import app  # pylint: disable=g-import-not-at-top

  if len(argv) != 2:
    raise app.UsageError("give one SavedModel directory: python -m engine.stock_ops VERSION_DIR")
  saved_model_dir = argv[1]
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  report: dict[str, Any] = {
    "custom_ops": custom_ops(saved_model_dir),
    "xla_functions": xla_compiled_functions(saved_model_dir),
    "loaded": False,
    "ran": False,
    "error": "",
  }
  try:
    loaded = tf.saved_model.load(saved_model_dir)
    report["loaded"] = True
    report["signatures"] = sorted(loaded.signatures.keys())
    for function in loaded.signatures.values():  # Run each once: kernels must exist, not just op defs.
      inputs = {
        name: tf.zeros([1 if dim is None else dim for dim in spec.shape], spec.dtype)
        for name, spec in function.structured_input_signature[1].items()
      }
      function(**inputs)
    report["ran"] = True
  except Exception as error:  # pylint: disable=broad-except
    report["error"] = f"{type(error).__name__}: {error}"[-2000:]
  report["scann_imported"] = any(name == "scann" or name.startswith("scann.") for name in sys.modules)
  print(json.dumps(report))


if __name__ == "__main__":
  # As the console scripts: TensorFlow's start-up lines (a cuInit ERROR on machines without CUDA) kept
  # out of the report, and a missing or damaged version said in one line rather than a traceback.
  from cli import launch  # pylint: disable=g-import-not-at-top

  launch.prepare_tensorflow(sys.argv)
  launch.run_module(_main)
