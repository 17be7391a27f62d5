"""fgr-bench: recall, QPS, latency, build time and bytes of every index backend on the same vectors.

Every in-graph backend is saved as SavedModel signatures and run through `TF_SessionRun`, the way TF
Serving runs a served model (see `bench/served_index.py`); hnswlib and Faiss, when installed, run on
the same vectors in the same process so ratios are measured side by side. Writes a markdown report, a
recall-vs-QPS plot and a summary section (benchmarks.md) into --out_dir; the figures users read are
copied by hand, with their command, into docs/performance.md.

  fgr-bench                          # 1M x 64 hard synthetic catalog, k=100
  fgr-bench --num_items=20000        # a quick run
  fgr-bench --embeddings=items.npy --queries=queries.npy
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
from absl import app, flags, logging
from google.protobuf import text_format
from tensorflow.core.protobuf import config_pb2
from tqdm import tqdm

from bench import catalog, extras, index_profiles, report, served_index
from bench.fixtures import latency
from cli import launch
from engine import base, search_ops, stock_ops
from export import report_file

_NUM_ITEMS = flags.DEFINE_integer("num_items", 1_000_000, "Synthetic catalog size (ignored with --embeddings).")
_DIM = flags.DEFINE_integer("dim", 64, "Synthetic embedding dimension.")
_NOISE = flags.DEFINE_float("noise", 0.5, "Within-cluster spread of the synthetic catalog.")
_EMBEDDINGS = flags.DEFINE_string("embeddings", None, "Optional .npy of float32 item embeddings [N, d].")
_QUERIES = flags.DEFINE_string(
  "queries",
  None,
  "Optional .npy of float32 query embeddings [Q, d]; with "
  "--embeddings and no --queries, perturbed catalog rows are used.",
)
_K = flags.DEFINE_integer("k", 100, "Neighbours per query.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 1000, "Evaluation queries (recall and batched QPS).")
_NUM_TUNING_QUERIES = flags.DEFINE_integer(
  "num_tuning_queries", 200, "Held-out queries backends may tune on (never evaluated)."
)
_NUM_SINGLE = flags.DEFINE_integer("num_single", 300, "Queries sent one at a time for single-query QPS/latency.")
_NUM_SINGLE_SWEEP = flags.DEFINE_integer("num_single_sweep", 300, "Single queries per sweep point.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Queries per call for batched QPS.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds of single-query timing across all backends.")
_BACKENDS = flags.DEFINE_list(
  "backends",
  ["brute_force", "brute_force_xla", "brute_force_bf16", "scann", "int8", "binary", "binary_random", "partitioned"],
  "In-graph backends (variants of the registry's backends) to measure.",
)
_EXTRAS = flags.DEFINE_list(
  "extras", ["hnswlib", "faiss_ivfpq"], "Out-of-graph libraries to compare: hnswlib, faiss_ivfpq, faiss_hnsw."
)
_SWEEP = flags.DEFINE_bool("sweep", True, "Sweep search knobs for recall-vs-QPS curves.")
_OUT_DIR = flags.DEFINE_string("out_dir", "bench_output/index_bench", "Where the report, plot and benchmarks.md go.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic catalog.")
_RESULTS_JSON = flags.DEFINE_string("results_json", None, "Optional path for every measurement as JSON.")
# Run each session's ops in the calling thread rather than handing them to the inter-op pool: measured
# at 1M x 64 on 2 cores, the per-call floor drops from 0.20 to 0.06 ms and ScaNN's single-query p50
# from 0.79 to 0.56 ms, while exact search (whose matmul uses the intra-op pool) is unchanged.
# fgr-serve takes the same ConfigProto with --tensorflow_session_config_file.
CALLER_THREAD_CONFIG = "inter_op_parallelism_threads: -1"
_SESSION_CONFIG = flags.DEFINE_string(
  "session_config",
  CALLER_THREAD_CONFIG,
  "Text ConfigProto of the sessions every in-graph backend runs in (as "
  "fgr-serve's --tensorflow_session_config_file); the floor and ScaNN are also profiled with TensorFlow's "
  "default ConfigProto.",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where SavedModels are written before loading (default: a temp dir).")

# Variants: (registry backend, build options, the knob a sweep varies, sweep values as fractions or multiples).
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
  "brute_force": ("brute_force", {}),
  "brute_force_xla": ("brute_force", {"jit_compile": True}),
  "brute_force_bf16": ("brute_force", {"dtype": "bfloat16"}),
  "scann": ("scann", {}),
  "int8": ("int8", {}),
  # Its codes scored without XLA, as stock TF Serving runs them without --xla_cpu_compilation_enabled.
  "int8_bf16": ("int8", {"jit_compile": False}),
  # The Hamming scan under XLA, as docs/performance.md's table measured it (the export's default is off).
  "binary": ("binary", {"jit_compile": True}),
  "binary_random": ("binary", {"learned": False, "jit_compile": True}),
  "partitioned": ("partitioned", {}),
}


@dataclasses.dataclass
class Measurement:
  """One backend (or one sweep point of it) on the evaluation queries."""

  name: str
  setting: str
  recall: float
  single_qps: float
  p50_ms: float
  p99_ms: float
  batch_qps: float = float("nan")
  batch_p50_ms: float = float("nan")
  batch_p99_ms: float = float("nan")
  build_seconds: float = float("nan")
  build_cpu_seconds: float = float("nan")
  nbytes: int = 0
  code_bytes: int = 0
  in_graph: bool = True
  note: str = ""


def load_vectors() -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """Returns (items, evaluation queries, tuning queries, description)."""
  needed = _NUM_QUERIES.value + _NUM_TUNING_QUERIES.value
  if _EMBEDDINGS.value:
    items = np.ascontiguousarray(np.load(_EMBEDDINGS.value), dtype=np.float32)
    if _QUERIES.value:
      queries = np.ascontiguousarray(np.load(_QUERIES.value), dtype=np.float32)
      source = f"{_EMBEDDINGS.value} with queries {_QUERIES.value}"
    else:  # Perturbed catalog rows, renormalised: neighbours exist but the query is not an item.
      rng = np.random.default_rng(_SEED.value)
      rows = items[rng.choice(items.shape[0], needed, replace=items.shape[0] < needed)]
      queries = rows + 0.5 * rows.std() * rng.normal(size=rows.shape).astype(np.float32)
      queries /= np.linalg.norm(queries, axis=1, keepdims=True)
      source = f"{_EMBEDDINGS.value} (queries: perturbed catalog rows)"
  else:
    items, queries = catalog.synthetic_catalog(
      _NUM_ITEMS.value, _DIM.value, num_queries=needed, noise=_NOISE.value, seed=_SEED.value
    )
    source = f"synthetic catalog {items.shape[0]:,} x {items.shape[1]} (noise {_NOISE.value}, seed {_SEED.value})"
  if queries.shape[0] < needed:
    raise ValueError(f"need {needed} queries, got {queries.shape[0]}")
  return items, queries[_NUM_TUNING_QUERIES.value : needed], queries[: _NUM_TUNING_QUERIES.value], source


def latencies(call: Callable[[np.ndarray], Any], batches: list[np.ndarray], warm_up: bool = True) -> np.ndarray:
  """Wall time in ms of each call (after one warm-up call unless told otherwise)."""
  if warm_up:
    call(batches[0])
  out = np.empty(len(batches))
  for i, batch in enumerate(batches):
    start = time.perf_counter()
    call(batch)
    out[i] = (time.perf_counter() - start) * 1e3
  return out


def _p50_p99_ms(milliseconds: np.ndarray) -> tuple[float, float]:
  p = latency.percentiles(milliseconds / 1e3, (50, 99), digits=4)
  return p["p50_ms"], p["p99_ms"]


@dataclasses.dataclass
class Candidate:
  """One setting to time: its measurement so far and its single-query search."""

  measurement: Measurement
  search: Callable[[np.ndarray], np.ndarray]
  num_single: int


def evaluate(
  name: str,
  setting: str,
  search: Callable[[np.ndarray], np.ndarray],
  queries: np.ndarray,
  truth: np.ndarray,
  batch_search: Callable[[np.ndarray], np.ndarray] | None = None,
  in_graph: bool = True,
) -> Measurement:
  """Recall over every query (batched); with `batch_search`, also batched QPS and latency."""
  batch = _BATCH_SIZE.value
  found = np.concatenate([search(queries[i : i + batch]) for i in range(0, queries.shape[0], batch)])
  result = Measurement(
    name, setting, search_ops.recall_at_k(found, truth), float("nan"), float("nan"), float("nan"), in_graph=in_graph
  )
  if batch_search is not None:
    batched = latencies(batch_search, [queries[i : i + batch] for i in range(0, queries.shape[0] - batch + 1, batch)])
    result.batch_qps = batch * 1e3 / batched.mean()
    result.batch_p50_ms, result.batch_p99_ms = _p50_p99_ms(batched)
  return result


# Untimed queries at the start of each timed slice (see `time_single_queries`).
_WARM_QUERIES = 5


def time_single_queries(candidates: list[Candidate], queries: np.ndarray, rounds: int) -> None:
  """Single-query QPS, p50 and p99 of every candidate, interleaved over `rounds` rounds.

  The machine is shared, so load drifts: each round times a slice of queries on every candidate in
  turn, and all candidates see the same drift, which keeps their ratios fair. Each round visits the
  candidates in a new (seeded) order, and each slice starts with a few untimed queries: a server
  running one index keeps that index's hot parts (centroids, codebooks, upper graph layers) in cache,
  whereas here another backend's 20 ms exact scans have just flushed them.
  """
  for candidate in candidates:
    candidate.search(queries[:1])  # Warm up (trace) outside the timed rounds.
  times: list[list[np.ndarray]] = [[] for _ in candidates]
  rng = np.random.default_rng(0)
  for r in tqdm(range(rounds), desc="single-query rounds"):
    for i in rng.permutation(len(candidates)):
      candidate = candidates[i]
      per_round = max(1, candidate.num_single // rounds)
      start = (r * per_round) % max(1, queries.shape[0] - per_round - _WARM_QUERIES)
      for j in range(start, start + _WARM_QUERIES):
        candidate.search(queries[j : j + 1])
      timed = range(start + _WARM_QUERIES, start + _WARM_QUERIES + per_round)
      times[i].append(latencies(candidate.search, [queries[j : j + 1] for j in timed], warm_up=False))
  for candidate, parts in zip(candidates, times):
    all_times = np.concatenate(parts)
    m = candidate.measurement
    m.single_qps = 1e3 / all_times.mean()
    m.p50_ms, m.p99_ms = _p50_p99_ms(all_times)


def session_config(text: str | None = None) -> config_pb2.ConfigProto:
  """A ConfigProto parsed from text (default: --session_config)."""
  return text_format.Parse(_SESSION_CONFIG.value if text is None else text, config_pb2.ConfigProto())


def _profile_measurement(name: str, setting: str) -> Measurement:
  return Measurement(report.PROFILE_PREFIX + name, setting, float("nan"), float("nan"), float("nan"), float("nan"))


def sweep_points(variant: str, index: base.Index, k: int) -> list[dict[str, int]]:
  """Search settings to sweep for a recall-vs-QPS curve, around the built default."""
  if variant == "scann" and index.config["num_leaves"]:
    leaves = index.config["num_leaves"]
    # Steps of ~15-25% in leaves near the recall-0.95 frontier, as fine as hnswlib's ef steps there.
    return [
      {"leaves_to_search": max(1, int(leaves * f)), "pre_reorder_num_neighbors": r}
      for f in (0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05)
      for r in (3 * k, 4 * k, 5 * k, 6 * k)
    ]
  if variant == "partitioned":
    return [{"probes": max(1, int(index.num_partitions * f))} for f in (0.01, 0.02, 0.03, 0.05, 0.08, 0.12)]
  if variant.startswith("int8"):
    return [{"rerank_candidates": m * k} for m in (1, 2, 4, 8)]
  if variant.startswith("binary"):
    return [{"rerank_candidates": m * k} for m in (10, 20, 40, 80, 160)]
  return []


def stock_check(index: base.Index, dim: int, k: int) -> str:
  """Saves the index in a SavedModel and loads it in a fresh process without ScaNN."""
  with tempfile.TemporaryDirectory() as path:
    module = tf.Module()
    module.index = index
    search = tf.function(lambda q: tuple(index.search(q, k)), input_signature=[tf.TensorSpec([None, dim], tf.float32)])
    tf.saved_model.save(module, path, signatures={"search": search.get_concrete_function()})
    result = stock_ops.load_in_fresh_process(path)
  ok = result["loaded"] and result["ran"] and not result["custom_ops"] and not result["scann_imported"]
  return "loads and runs in a fresh process without ScaNN, no custom op" if ok else f"stock load FAILED: {result}"


def prepare_in_graph(
  variant: str, items: np.ndarray, queries: np.ndarray, tuning: np.ndarray, truth: np.ndarray, k: int, workdir: str
) -> list[Candidate]:
  """Builds one in-graph variant and loads it as served; measures recall (every setting) and batched QPS."""
  backend, options = _VARIANTS[variant]
  options = dict(options)
  if backend != "brute_force":
    options["tuning_queries"] = tuning
  start, start_cpu = time.perf_counter(), time.process_time()
  index = base.build_index(backend, items, k=k, **options)
  build_seconds, build_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
  breakdown = index.memory_breakdown() if hasattr(index, "memory_breakdown") else {}
  note = ""
  if variant == "scann":
    config = index.config
    note = (
      f"leaves {config['leaves_to_search']}/{config['num_leaves']}, reorder {config['reorder']}, "
      f"train {config['train_seconds']:.1f}s + tune {config['build_seconds'] - config['train_seconds']:.1f}s"
    )
  elif variant == "partitioned":
    note = f"probes {index.default_probes}/{index.num_partitions}; " + stock_check(index, items.shape[1], k)
  elif breakdown:
    note = f"rerank_candidates {index.rerank_candidates}; " + ", ".join(
      f"{key} {value / 2**20:.1f} MiB" for key, value in breakdown.items()
    )
  served = served_index.ServedIndex(index, k, workdir, session_config())
  search = served.searcher()
  default = evaluate(variant, "default", search, queries, truth, batch_search=search)
  default.build_seconds = build_seconds
  default.build_cpu_seconds = build_cpu_seconds
  default.nbytes = index.nbytes()
  default.code_bytes = breakdown.get("codes", index.nbytes())
  default.note = note
  candidates = [Candidate(default, search, _NUM_SINGLE.value)]
  if variant == "scann":
    op_only = served_index.ServedIndex(index_profiles.ScannOpOnly(index), k, workdir, session_config()).searcher()
    candidates.append(
      Candidate(
        _profile_measurement("scann_op_only", "session: TensorsToScann + ScannSearch of final_candidates, no filter"),
        op_only,
        _NUM_SINGLE.value,
      )
    )
    if _SESSION_CONFIG.value:
      candidates.append(
        Candidate(
          _profile_measurement(
            "scann_default_session_config", "scann default, session with TensorFlow's default ConfigProto"
          ),
          served_index.ServedIndex(index, k, workdir, session_config("")).searcher(),
          _NUM_SINGLE.value,
        )
      )
    candidates.append(
      Candidate(
        _profile_measurement(
          "scann_python_session",
          "scann default in a tf.compat.v1.Session through make_callable, as fgr-serve ran it before direct_session",
        ),
        served_index.ServedIndex(index, k, workdir, session_config(), runner="python").searcher(),
        _NUM_SINGLE.value,
      )
    )
    candidates.append(
      Candidate(
        _profile_measurement("scann_tf_function", "scann default through an eager tf.function"),
        index_profiles.tf_function_search(index, k),
        _NUM_SINGLE.value,
      )
    )
  if _SWEEP.value:
    for point in sweep_points(variant, index, k):
      setting = ", ".join(f"{key}={value}" for key, value in point.items())
      point_search = served.searcher(**point)
      candidates.append(
        Candidate(evaluate(variant, setting, point_search, queries, truth), point_search, _NUM_SINGLE_SWEEP.value)
      )
  return candidates


def prepare_extra(name: str, items: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int) -> list[Candidate]:
  """Builds one out-of-graph library index; measures recall and batched QPS of its knob sweep."""
  start, start_cpu = time.perf_counter(), time.process_time()
  library = extras.build(name, items, k)
  build_seconds, build_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
  candidates = []
  for i, (setting, search, batch_search) in enumerate(library.settings()):
    measured = evaluate(name, setting, batch_search, queries, truth, batch_search=batch_search, in_graph=False)
    measured.build_seconds = build_seconds
    measured.build_cpu_seconds = build_cpu_seconds
    measured.nbytes = measured.code_bytes = library.nbytes
    candidates.append(Candidate(measured, search, _NUM_SINGLE.value if i == 0 else _NUM_SINGLE_SWEEP.value))
    if not _SWEEP.value:
      break
  return candidates


def _main(argv: list[str]) -> None:
  del argv
  if _NUM_QUERIES.value < _BATCH_SIZE.value:
    # Batched QPS times whole batches: there was none, and the first backend ended in an IndexError.
    raise app.UsageError(f"--num_queries ({_NUM_QUERIES.value}) must be at least --batch_size ({_BATCH_SIZE.value})")
  if _RESULTS_JSON.value:
    try:  # Before measuring: a report that could not be written was found out after minutes, and lost.
      report_file.check(_RESULTS_JSON.value, make_directory=True)
    except (OSError, ValueError) as e:
      raise app.UsageError(str(e).replace("--report_file", "--results_json")) from None
  k = _K.value
  started = datetime.datetime.now(datetime.timezone.utc)
  load_before = os.getloadavg()[1]
  items, queries, tuning, source = load_vectors()
  logging.info("%s; %d evaluation and %d tuning queries", source, queries.shape[0], tuning.shape[0])
  start = time.perf_counter()
  truth = search_ops.exact_top_k_numpy(queries, items, k)
  logging.info("exact NumPy reference in %.1fs", time.perf_counter() - start)

  unknown = set(_BACKENDS.value) - set(_VARIANTS)
  if unknown:
    raise app.UsageError(f"unknown backends {sorted(unknown)}; choose from {sorted(_VARIANTS)}")
  candidates: list[Candidate] = []
  jobs = [("graph", v) for v in _BACKENDS.value] + [("extra", e) for e in _EXTRAS.value]
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="fgr_bench_")
  for kind, name in tqdm(jobs, desc="build + recall"):
    if kind == "graph":
      prepared = prepare_in_graph(name, items, queries, tuning, truth, k, workdir)
    elif not extras.available(name):
      logging.warning("%s is not installed (pip install -e '.[bench]'); skipped", name)
      continue
    else:
      prepared = prepare_extra(name, items, queries, truth, k)
    for c in prepared:
      logging.info(
        "%s [%s]: recall %.4f, batched %.0f QPS, built in %.1fs",
        c.measurement.name,
        c.measurement.setting,
        c.measurement.recall,
        c.measurement.batch_qps,
        c.measurement.build_seconds,
      )
    candidates.extend(prepared)
  candidates.append(
    Candidate(
      _profile_measurement("session_floor", "C API session: the signature returns its input"),
      served_index.ServedIndex(index_profiles.Identity(), k, workdir, session_config()).searcher(),
      _NUM_SINGLE.value,
    )
  )
  candidates.append(
    Candidate(
      _profile_measurement("python_session_floor", "the same in a tf.compat.v1.Session"),
      served_index.ServedIndex(index_profiles.Identity(), k, workdir, session_config(), runner="python").searcher(),
      _NUM_SINGLE.value,
    )
  )
  if _SESSION_CONFIG.value:
    candidates.append(
      Candidate(
        _profile_measurement("session_floor_default_config", "the same, TensorFlow's default ConfigProto"),
        served_index.ServedIndex(index_profiles.Identity(), k, workdir, session_config("")).searcher(),
        _NUM_SINGLE.value,
      )
    )
  candidates.append(
    Candidate(
      _profile_measurement("tf_function_floor", "tf.identity in an eager tf.function"),
      index_profiles.tf_call_floor(),
      _NUM_SINGLE.value,
    )
  )
  time_single_queries(candidates, queries, _ROUNDS.value)
  results = [c.measurement for c in candidates]
  for m in results:
    logging.info(
      "%s [%s]: recall %.4f, single %.0f QPS (p50 %.2f ms, p99 %.2f ms)",
      m.name,
      m.setting,
      m.recall,
      m.single_qps,
      m.p50_ms,
      m.p99_ms,
    )

  command = "fgr-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  context = report.Context(
    date=started.strftime("%Y-%m-%d %H:%M UTC"),
    command=command,
    source=source,
    num_items=items.shape[0],
    dim=items.shape[1],
    k=k,
    num_queries=queries.shape[0],
    batch_size=_BATCH_SIZE.value,
    cpus=os.cpu_count() or 0,
    session_config=_SESSION_CONFIG.value,
    load=f"5-minute load average {load_before:.1f} at the start, {os.getloadavg()[1]:.1f} at the end",
  )
  paths = report.write(results, context, _OUT_DIR.value)
  if _RESULTS_JSON.value:
    with open(_RESULTS_JSON.value, "w") as f:
      json.dump(
        {"context": dataclasses.asdict(context), "results": [dataclasses.asdict(r) for r in results]}, f, indent=1
      )
    paths.append(_RESULTS_JSON.value)
  if not _WORKDIR.value:
    shutil.rmtree(workdir, ignore_errors=True)
  for line in report.targets(results, context):
    print(line)
  print("wrote", ", ".join(paths))


if __name__ == "__main__":
  launch.run_module(_main)
