"""Latency of diversity re-ranking (engine.diversity) at batch 1: none, ssd and dpp, plain graph and XLA.

Each configuration is `engine.diversity.rerank` in a `tf.function` taking the method and knobs as
tensors, as a serving signature would, over random candidates (unit-Gaussian embeddings, Gaussian
scores, all valid). Calls are interleaved round-robin across methods and variants, so load from other
jobs on a shared machine hits them all alike, and each method's p50 is reported as a ratio to "none"
of the same variant and candidate count, measured side by side. One JSON line per configuration.

  python -m bench.diversity_latency --rounds=200
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import tensorflow as tf
from absl import flags

from bench.fixtures import latency
from cli import launch
from engine import diversity

FLAGS = flags.FLAGS
flags.DEFINE_list("num_candidates", ["200", "400"], "Candidates per request (n).")
flags.DEFINE_integer("dim", 64, "Embedding dimension (d).")
flags.DEFINE_integer("k", 50, "Picks per request.")
flags.DEFINE_integer("window", 10, "Sliding window of both methods.")
flags.DEFINE_float("gamma", 0.5, "SSD's diversity weight.")
flags.DEFINE_float("theta", 0.7, "DPP's relevance/diversity trade-off.")
flags.DEFINE_integer("rounds", 100, "Timed calls per configuration (after warm-up).")
flags.DEFINE_integer("warmup", 5, "Untimed calls per configuration first (XLA compiles on the first).")


def _function(jit_compile: bool, k: int) -> tf.types.experimental.ConcreteFunction:
  @tf.function
  def rerank(embeddings, scores, valid, method, window, gamma, theta):
    return diversity.rerank(method, embeddings, scores, valid, k, window, gamma, theta, jit_compile=jit_compile)

  return rerank.get_concrete_function(
    tf.TensorSpec([None, None, FLAGS.dim], tf.float32),
    tf.TensorSpec([None, None], tf.float32),
    tf.TensorSpec([None, None], tf.bool),
    tf.TensorSpec([], tf.string),
    tf.TensorSpec([], tf.int32),
    tf.TensorSpec([], tf.float32),
    tf.TensorSpec([], tf.float32),
  )


def main(argv: list[str]) -> None:
  del argv
  rng = np.random.default_rng(0)
  knobs = (tf.constant(FLAGS.window), tf.constant(FLAGS.gamma), tf.constant(FLAGS.theta))
  functions = {jit: _function(jit, FLAGS.k) for jit in (False, True)}
  configs = [
    (int(n), jit, method) for n in FLAGS.num_candidates for jit in (False, True) for method in diversity.METHODS
  ]
  inputs = {}
  for n in {c[0] for c in configs}:
    inputs[n] = (
      tf.constant(rng.normal(size=[1, n, FLAGS.dim]).astype(np.float32)),
      tf.constant(rng.normal(size=[1, n]).astype(np.float32)),
      tf.ones([1, n], tf.bool),
    )

  def call(config: tuple[int, bool, str]) -> None:
    n, jit, method = config
    functions[jit](*inputs[n], tf.constant(method), *knobs).numpy()

  for config in configs:
    for _ in range(FLAGS.warmup):
      call(config)
  times: dict[tuple[int, bool, str], list[float]] = {config: [] for config in configs}
  for _ in range(FLAGS.rounds):
    for i in rng.permutation(len(configs)):
      started = time.perf_counter()
      call(configs[i])
      times[configs[i]].append(time.perf_counter() - started)

  command = " ".join(["python -m bench.diversity_latency"] + sys.argv[1:])
  stats = {config: latency.percentiles(values, (50, 99), digits=3) for config, values in times.items()}
  for (n, jit, method), values in stats.items():
    none = stats[(n, jit, "none")]
    line = {
      "command": command,
      "method": method,
      "jit_compile": jit,
      "batch": 1,
      "n": n,
      "d": FLAGS.dim,
      "k": FLAGS.k,
      "window": FLAGS.window,
      "rounds": FLAGS.rounds,
      **values,
      "p50_vs_none": round(values["p50_ms"] / none["p50_ms"], 2),
      "p99_vs_none": round(values["p99_ms"] / none["p99_ms"], 2),
    }
    print(json.dumps(line))


if __name__ == "__main__":
  launch.run_module(main)
