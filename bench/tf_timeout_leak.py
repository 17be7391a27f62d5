"""TensorFlow alone: failing session runs leak when given RunOptions.timeout_in_ms.

Why fgr-serve passes no run timeout (serving/README.md, "Deadlines"). A two-input SavedModel
(`a + b`) is loaded into a `tf.compat.v1.Session`, the way TF Serving and fgr-serve load one, and
fed inputs of different lengths, so every run fails inside the graph ("Incompatible shapes"). With
a timeout, DirectSession runs the step on its asynchronous path, and in TF 2.20 each failing run
leaves its aborted rendezvous behind (heaptrack: blocks allocated by
`RefCountedIntraProcessRendezvous`, made in `DirectSession::RunInternal` and aborted by
`ExecutorBarrier::WhenDone`). Without one, or with `inter_op_thread_pool=-1` alone, the step runs
synchronously and nothing stays.

Prints, for each RunOptions variant, the growth of RSS and of malloc's in-use bytes (glibc's
mallinfo2, which sees freed memory that RSS keeps) over `--runs` failing runs, then after the
session is closed.

  python -m bench.tf_timeout_leak [--runs=20000]
"""

import argparse
import ctypes
import gc
import os
import tempfile

import numpy as np
import psutil
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2

VARIANTS = {
  "none": None,
  "timeout": config_pb2.RunOptions(timeout_in_ms=30000),
  "caller_thread": config_pb2.RunOptions(inter_op_thread_pool=-1),
  "timeout_and_caller_thread": config_pb2.RunOptions(timeout_in_ms=30000, inter_op_thread_pool=-1),
}


class _MallInfo2(ctypes.Structure):
  _fields_ = [
    (name, ctypes.c_size_t)
    for name in (
      "arena",
      "ordblks",
      "smblks",
      "hblks",
      "hblkhd",
      "usmblks",
      "fsmblks",
      "uordblks",
      "fordblks",
      "keepcost",
    )
  ]


def malloc_in_use_bytes() -> int:
  """Bytes malloc has handed out and not had back (glibc)."""
  libc = ctypes.CDLL("libc.so.6")
  libc.mallinfo2.restype = _MallInfo2
  info = libc.mallinfo2()
  return info.uordblks + info.hblkhd


class AddModule(tf.Module):
  """Two float vectors in, their sum out: a run fails in the graph when their lengths differ."""

  @tf.function(
    input_signature=[tf.TensorSpec([None], tf.float32, name="a"), tf.TensorSpec([None], tf.float32, name="b")]
  )
  def add(self, a, b):
    return {"s": a + b}


def measure(export_dir: str, options: config_pb2.RunOptions | None, runs: int) -> tuple[float, float, float]:
  """(RSS growth, in-use growth, in-use growth once the session is closed), in bytes per run."""
  graph = tf.Graph()
  session = tf.compat.v1.Session(graph=graph)
  with graph.as_default():
    meta_graph = tf.compat.v1.saved_model.load(session, ["serve"], export_dir)
  signature = meta_graph.signature_def["serving_default"]
  a, b, s = signature.inputs["a"].name, signature.inputs["b"].name, signature.outputs["s"].name
  feeds = {a: np.ones(2, np.float32), b: np.ones(3, np.float32)}

  def fail(count: int) -> None:
    for _ in range(count):
      try:
        session.run(s, feeds, options=options)
      except tf.errors.InvalidArgumentError:
        pass

  fail(200)  # One-off costs (kernels, logging) before measuring.
  gc.collect()
  process = psutil.Process()
  rss, in_use = process.memory_info().rss, malloc_in_use_bytes()
  fail(runs)
  gc.collect()
  rss_growth, in_use_growth = process.memory_info().rss - rss, malloc_in_use_bytes() - in_use
  session.close()
  gc.collect()
  return rss_growth / runs, in_use_growth / runs, (malloc_in_use_bytes() - in_use) / runs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=int, default=20000, help="failing runs per RunOptions variant")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    export_dir = os.path.join(tmp, "add")
    module = AddModule()
    tf.saved_model.save(module, export_dir, signatures={"serving_default": module.add})
    print(f"{args.runs} failing runs per variant; growth per run (bytes): RSS, malloc in use, in use after close")
    for name, options in VARIANTS.items():
      rss, in_use, after_close = measure(export_dir, options, args.runs)
      print(f"  {name:26s} {rss:8.0f} {in_use:8.0f} {after_close:8.0f}")


if __name__ == "__main__":
  main()
