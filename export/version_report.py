"""The report every version carries in assets.extra: what built it, from what, and how long it took.

fgr-export writes it; fgr-refresh writes one for each version it publishes and reads the source
version's to rebuild the same index (backend, k, options, the config the build resolved and tuned).
The CLIs print it as JSON, and benchmarks read it from the versions they measure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from export import version_files, versions

REPORT_FILE = "export_report.json"
# The report's path relative to a version directory.
REPORT_PATH = os.path.join(version_files.EXTRA_DIR, REPORT_FILE)

_RECALL = re.compile(r"^recall_at_(\d+)_vs_exact$")
_WARMUP_RECALL = re.compile(r"^recall_at_(\d+)_vs_exact_on_warmup_queries$")
_SECONDS_SUFFIX = "_seconds"


@dataclasses.dataclass
class VersionReport:
  """One version's report. Fields left None are not written.

  Attributes:
    version: the version number.
    path: the version directory.
    kind: how fgr-refresh made it ("rebuild", "status_only", "rollback"); None for fgr-export.
    refreshed_from: the version a refresh started from.
    index: the index backend (`engine.base.available_backends()`).
    k: candidates returned per request.
    data: the training run's data spec (`models.data.sources.DataSpec.to_json`): the catalog and the
      test split the version serves, which fgr-eval --model_path judges it on.
    exclusions, exclusion_depth: the query feature whose ids the graph never returns, and the extra
      candidates it searches for them (`engine.full_graph.FullGraph`); None when it excludes none.
    cooccurrence: the fused co-occurrence channel's settings (`engine.full_graph.cooccurrence_config`);
      None without one. Its table lives in the version's checkpoint.
    precision, jit_compile: how fgr-export built the towers.
    needs_xla: whether the graph holds functions that must be XLA-compiled
      (`engine.stock_ops.xla_compiled_functions`): stock TF Serving then needs
      `--xla_cpu_compilation_enabled=true`, or the version never loads.
    index_options: the options the index was built with (a refresh's include the kept tuned knobs).
    index_config: the index's resolved build configuration (`engine.base.Index.config`).
    index_update: how a refresh built the index ("full", "incremental", "retrained").
    num_items, num_eligible: catalog rows, and those that may be returned.
    index_bytes: `engine.base.Index.nbytes()`.
    graph: whose graph serves the version: "version N's" (reused) or "traced".
    graph_traced_because: why a refresh traced the serving functions anew.
    recall: recall@k against exact search on held-out queries (written as recall_at_<k>_vs_exact).
    warmup_recall: a refresh's recall@k against exact search on the warm-up queries
      (recall_at_<k>_vs_exact_on_warmup_queries).
    delta: what a refresh's catalog delta changed, by kind of change.
    background_retrain_started: whether this refresh started training the index anew in the background.
    timings: seconds by step, each written as a top-level "<step>_seconds" key.
    published_at: wall-clock time the version became visible to servers.
    extra: any other keys, kept as they are.
  """

  version: int
  path: str
  kind: str | None = None
  refreshed_from: int | None = None
  index: str | None = None
  k: int | None = None
  exclusions: str | None = None
  exclusion_depth: int | None = None
  cooccurrence: dict[str, Any] | None = None
  data: dict[str, Any] | None = None
  precision: str | None = None
  jit_compile: bool | None = None
  needs_xla: bool | None = None
  index_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  index_config: dict[str, Any] = dataclasses.field(default_factory=dict)
  index_update: str | None = None
  num_items: int | None = None
  num_eligible: int | None = None
  index_bytes: int | None = None
  graph: str | None = None
  graph_traced_because: str | None = None
  recall: float | None = None
  warmup_recall: float | None = None
  delta: dict[str, int] | None = None
  background_retrain_started: bool | None = None
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  published_at: float | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    """The report as a JSON object (what the version holds and the CLIs print)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in ("timings", "extra"):
        continue
      if field.name == "recall":
        field_name = f"recall_at_{self.k}_vs_exact"
      elif field.name == "warmup_recall":
        field_name = f"recall_at_{self.k}_vs_exact_on_warmup_queries"
      else:
        field_name = field.name
      if value is not None:
        out[field_name] = value
    out.update(self.timings)
    out.update(self.extra)
    return out

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> VersionReport:
    names = {field.name for field in dataclasses.fields(cls)} - {"timings", "extra", "recall", "warmup_recall"}
    known: dict[str, Any] = {"timings": {}, "extra": {}}
    for key, value in data.items():
      if key in names:
        known[key] = value
      elif _RECALL.match(key):
        known["recall"] = value
      elif _WARMUP_RECALL.match(key):
        known["warmup_recall"] = value
      elif key.endswith(_SECONDS_SUFFIX) and isinstance(value, (int, float)):
        known["timings"][key] = value
      else:
        known["extra"][key] = value
    return cls(**known)

  def time(self, step: str, seconds: float, digits: int = 3) -> None:
    """Records the seconds `step` took (as "<step>_seconds")."""
    self.timings[step + _SECONDS_SUFFIX] = round(seconds, digits)


def path(version_path: str) -> str:
  return os.path.join(version_path, REPORT_PATH)


def exists(version_path: str) -> bool:
  return os.path.exists(path(version_path))


def read(version_path: str) -> VersionReport:
  """The report a version carries in assets.extra."""
  report_path = path(version_path)
  if not os.path.exists(version_path):
    raise FileNotFoundError(f"{version_path} does not exist")
  if not os.path.exists(report_path):
    message = f"{report_path} is missing: not a version written by fgr-export or fgr-refresh"
    names = os.listdir(version_path) if os.path.isdir(version_path) else []
    numbered = sorted(number for number in map(versions.version_number, names) if number is not None)
    if numbered:  # A base path: the versions are its numbered subdirectories.
      message += f"; {version_path} holds versions, so pass one, e.g. {os.path.join(version_path, str(numbered[-1]))}"
    raise FileNotFoundError(message)
  with open(report_path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{report_path} is not JSON ({e}): a damaged version") from None
  try:
    return VersionReport.from_json(data)
  except (AttributeError, TypeError):  # Not an object, or without the version and path every report has.
    raise ValueError(f"{report_path} is not a version report: a damaged version") from None


def write(saved_model_dir: str, report: VersionReport) -> str:
  """Writes `report` into saved_model_dir/assets.extra; returns the file's path."""
  report_path = path(saved_model_dir)
  os.makedirs(os.path.dirname(report_path), exist_ok=True)
  with open(report_path, "w") as f:
    json.dump(report.to_json(), f, indent=2)
  return report_path
