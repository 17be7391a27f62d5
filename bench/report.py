"""Markdown tables, the recall-vs-QPS plot, the done-when checks and fgr-bench's summary section."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

SECTION = "## Index backends"
PROFILE_PREFIX = "profile:"  # Timing-only probes (no recall): kept out of the tables and the plot.
REPORT_NAME = "index_backends.md"
PLOT_NAME = "index_backends_recall_qps.png"


@dataclasses.dataclass
class Context:
  """What was measured, where and how."""

  date: str
  command: str
  source: str
  num_items: int
  dim: int
  k: int
  num_queries: int
  batch_size: int
  cpus: int
  load: str = ""
  session_config: str = ""


def _fmt(value: float, digits: int = 0) -> str:
  return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def _mib(value: int) -> str:
  return f"{value / 2**20:,.1f}"


def _backends(results: Sequence[Any]) -> list[Any]:
  return [r for r in results if not r.name.startswith(PROFILE_PREFIX)]


def _defaults(results: Sequence[Any]) -> list[Any]:
  """The first measurement of each backend: its built default (or the first knob for libraries)."""
  seen, out = set(), []
  for r in _backends(results):
    if r.name not in seen:
      seen.add(r.name)
      out.append(r)
  return out


def best_at_recall(results: Sequence[Any], name: str, recall: float) -> Any | None:
  """The fastest single-query measurement of `name` reaching `recall`, if any."""
  qualifying = [r for r in results if r.name == name and r.recall >= recall]
  return max(qualifying, key=lambda r: r.single_qps) if qualifying else None


def main_table(results: Sequence[Any], context: Context) -> str:
  """One row per backend at its default setting."""
  float_bytes = context.num_items * context.dim * 4
  lines = [
    f"| backend | in graph | recall@{context.k} | single QPS | p50 ms | p99 ms | batched QPS (B={context.batch_size}) "
    "| batch p99 ms | build s (CPU s) | index MiB | codes MiB | codes / float32 | notes |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in _defaults(results):
    lines.append(
      f"| {r.name} | {'yes' if r.in_graph else 'no'} | {r.recall:.4f} | {_fmt(r.single_qps)} | {_fmt(r.p50_ms, 2)} "
      f"| {_fmt(r.p99_ms, 2)} | {_fmt(r.batch_qps)} | {_fmt(r.batch_p99_ms, 1)} | {_fmt(r.build_seconds, 1)} ({_fmt(r.build_cpu_seconds, 1)}) "
      f"| {_mib(r.nbytes)} | {_mib(r.code_bytes)} | 1/{float_bytes / max(r.code_bytes, 1):.1f} | {r.note} |"
    )
  return "\n".join(lines)


def sweep_table(results: Sequence[Any], context: Context) -> str:
  """Every measured setting (the recall-vs-QPS curves)."""
  lines = [f"| backend | setting | recall@{context.k} | single QPS | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
  for r in _backends(results):
    lines.append(
      f"| {r.name} | {r.setting} | {r.recall:.4f} | {_fmt(r.single_qps)} | {_fmt(r.p50_ms, 2)} | {_fmt(r.p99_ms, 2)} |"
    )
  return "\n".join(lines)


def targets(results: Sequence[Any], context: Context) -> list[str]:
  """The issue's done-when checks, each with its measured ratio, met or not."""
  by_name = {r.name: r for r in _defaults(results)}
  float_bytes = context.num_items * context.dim * 4
  lines = []

  def check(ok: bool, text: str) -> None:
    lines.append(f"- [{'x' if ok else ' '}] {text}")

  exact = by_name.get("brute_force")
  scann_best = best_at_recall(results, "scann", 0.95)
  if exact and "scann" in by_name:
    scann = by_name["scann"]
    ratio = scann.single_qps / exact.single_qps
    check(
      scann.recall >= 0.95 and ratio >= 50,
      f"ScaNN (default, tuned) recall@{context.k} {scann.recall:.4f} at {scann.single_qps:,.0f} single-query QPS = "
      f"{ratio:.1f}x exact float32 in-graph ({exact.single_qps:,.1f} QPS); target >= 0.95 at >= 50x",
    )
    if scann_best:
      check(
        scann_best.single_qps / exact.single_qps >= 50,
        f"ScaNN best point with recall >= 0.95 ({scann_best.setting}, recall {scann_best.recall:.4f}): "
        f"{scann_best.single_qps / exact.single_qps:.1f}x exact",
      )
    compared = scann_best or scann  # The point of the check above.
    for variant in ("brute_force_xla", "brute_force_bf16"):
      if variant in by_name:
        lines.append(
          f"  - vs {variant} ({by_name[variant].single_qps:,.1f} QPS): "
          f"{compared.single_qps / by_name[variant].single_qps:.1f}x"
        )
  hnsw_best = best_at_recall(results, "hnswlib", 0.95)
  if "scann" in by_name and "hnswlib" in by_name:
    if scann_best and hnsw_best:
      ratio = scann_best.single_qps / hnsw_best.single_qps
      check(
        ratio >= 1.0,
        f"ScaNN in graph vs hnswlib at recall >= 0.95 (single query): {scann_best.single_qps:,.0f} "
        f"vs {hnsw_best.single_qps:,.0f} QPS ({hnsw_best.setting}) = {ratio:.2f}x; target >= 1x",
      )
    else:
      check(
        False,
        f"ScaNN vs hnswlib at recall 0.95: a curve never reached 0.95 (ScaNN {bool(scann_best)}, "
        f"hnswlib {bool(hnsw_best)})",
      )
  for name, fraction, recall in (("int8", 4, 0.99), ("binary", 16, 0.95)):
    if name in by_name:
      r = by_name[name]
      ratio = float_bytes / r.code_bytes
      check(
        ratio >= fraction * 0.99 and r.recall >= recall,
        f"{name}: codes are 1/{ratio:.2f} of float32 (target 1/{fraction}; with the float32 rerank vectors the "
        f"index is {r.nbytes / float_bytes:.2f}x float32), recall@{context.k} {r.recall:.4f} (target >= {recall})",
      )
  if "binary" in by_name and "binary_random" in by_name:
    random_points = {r.setting: r for r in results if r.name == "binary_random" and r.setting != "default"}
    pairs = [
      (r.setting, r.recall, random_points[r.setting].recall)
      for r in results
      if r.name == "binary" and r.setting in random_points
    ]
    if pairs:
      lines.append(
        "  - learned vs random-hyperplane codes at the same rerank budget: "
        + "; ".join(f"{setting}: {learned:.4f} vs {random:.4f}" for setting, learned, random in pairs)
      )
  if "partitioned" in by_name:
    r = by_name["partitioned"]
    check(
      r.recall >= 0.95 and "FAILED" not in r.note,
      f"partitioned (stock ops): recall@{context.k} {r.recall:.4f} (target >= 0.95); {r.note}",
    )
  builds = ", ".join(f"{r.name} {r.build_seconds:.1f}s ({r.build_cpu_seconds:.1f} CPU s)" for r in _defaults(results))
  lines.append(f"- build times, wall (CPU over all threads): {builds}")
  if "scann" in by_name:
    scann = by_name["scann"]
    check(
      scann.build_seconds <= 30,
      f"ScaNN builds in {scann.build_seconds:.1f}s wall, {scann.build_cpu_seconds:.1f}s "
      f"CPU on {context.cpus} cores (target <= 30s)",
    )
  profile = [r for r in results if r.name.startswith(PROFILE_PREFIX)]
  if profile:
    lines.append(
      "- where single-query time goes (same interleaved rounds): "
      + "; ".join(
        f"{r.name[len(PROFILE_PREFIX) :]} ({r.setting}) p50 {r.p50_ms:.3f} ms, mean {1e3 / r.single_qps:.3f} ms"
        for r in profile
      )
    )
  return lines


def plot(results: Sequence[Any], context: Context, path: str) -> None:
  """Recall@k vs single-query QPS (log scale), one curve per backend, defaults starred."""
  fig, ax = plt.subplots(figsize=(9, 6))
  defaults = {id(r) for r in _defaults(results)}
  for name in dict.fromkeys(r.name for r in _backends(results)):
    points = sorted((r for r in results if r.name == name), key=lambda r: r.recall)
    (line,) = ax.plot(
      [p.recall for p in points],
      [p.single_qps for p in points],
      marker="o",
      markersize=3,
      linestyle="-" if points[0].in_graph else "--",
      label=name + ("" if points[0].in_graph else " (library)"),
    )
    for p in points:
      if id(p) in defaults and p.in_graph:
        ax.plot([p.recall], [p.single_qps], marker="*", markersize=12, color=line.get_color())
  ax.set_yscale("log")
  ax.set_xlabel(f"recall@{context.k}")
  ax.set_ylabel("single-query QPS")
  ax.axvline(0.95, color="grey", linewidth=0.8, linestyle=":")
  ax.set_title(f"{context.num_items:,} x {context.dim}, k={context.k}, {context.cpus} CPUs ({context.date})")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def served_path(context: Context) -> str:
  """How in-graph backends were run, in one sentence."""
  config = f"`{context.session_config}`" if context.session_config else "TensorFlow's default ConfigProto"
  return (
    "In-graph backends run as a C++ model server runs them: each index's search is saved as SavedModel "
    "signatures (`search` at the built defaults, like `serving_default`, and `search_with_options` for the "
    f"sweeps), loaded by TensorFlow's C API in a session ({config}, which fgr-serve takes with "
    "`--tensorflow_session_config_file`) and called through `TF_SessionRun`, the C++ `Session::Run` TF "
    "Serving calls. The `profile:` rows show the per-call floor of that path, of a Python "
    "`tf.compat.v1.Session` (as fgr-serve ran a model before `direct_session`) and of an eager `tf.function` "
    "call."
  )


def section(results: Sequence[Any], context: Context) -> str:
  """Our section of the summary benchmarks.md in fgr-bench's --out_dir."""
  return "\n".join(
    [
      SECTION,
      "",
      f"Measured {context.date} on {context.cpus} CPUs (shared machine, {context.load}: compare ratios within one run, "
      f"not absolute numbers across runs) with:",
      "",
      f"    {context.command}",
      "",
      f"{context.source}; {context.num_queries} evaluation queries, k={context.k}. {served_path(context)} "
      "Libraries run through their Python APIs on the same vectors. "
      f"Full sweep: [{REPORT_NAME}]({REPORT_NAME}).",
      "",
      main_table(results, context),
      "",
      f"![recall vs QPS]({PLOT_NAME})",
      "",
      "Done-when checks:",
      "",
      *targets(results, context),
      "",
    ]
  )


def replace_section(document: str, new_section: str) -> str:
  """Replaces our `## Index backends` section (up to the next `## ` heading) or appends it."""
  lines = document.splitlines()
  start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
  if start is None:
    head = document.rstrip("\n")
    return (head + "\n\n" if head else "# Benchmarks\n\n") + new_section.rstrip("\n") + "\n"
  end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
  rest = lines[end:]
  return "\n".join(lines[:start] + new_section.rstrip("\n").splitlines() + ([""] + rest if rest else [])) + "\n"


def write(results: Sequence[Any], context: Context, out_dir: str) -> list[str]:
  """Writes the full report, the plot and our section of benchmarks.md; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  report_path = os.path.join(out_dir, REPORT_NAME)
  plot_path = os.path.join(out_dir, PLOT_NAME)
  bench_path = os.path.join(out_dir, "benchmarks.md")
  plot(results, context, plot_path)
  with open(report_path, "w") as f:
    f.write(
      "\n".join(
        [
          "# Index backends: full results",
          "",
          f"{context.date}, `{context.command}`",
          "",
          f"{context.source}; {context.cpus} CPUs, {context.load}. {served_path(context)}",
          "",
          "## Defaults",
          "",
          main_table(results, context),
          "",
          "## Every setting",
          "",
          sweep_table(results, context),
          "",
          "## Done-when checks",
          "",
          *targets(results, context),
          "",
        ]
      )
    )
  existing = open(bench_path).read() if os.path.exists(bench_path) else ""
  with open(bench_path, "w") as f:
    f.write(replace_section(existing, section(results, context)))
  return [report_path, plot_path, bench_path]
