"""Recall channels end to end: each channel, the merged list and its diversity re-rankings, and their cost.

`--mode=quality` trains the semantic and efficiency channels on the synthetic search-ads logs
(`fgr-train --channels`), exports them as one graph, and judges every knob setting through that
graph's own signature (`export.served_evaluation`): each channel alone, merged, and merged then
re-ranked by SSD (for each `--ssd_gammas`) and DPP (each `--dpp_thetas`), all at the same k.

`--mode=latency` times batch-1 calls side by side, in rounds: the efficiency channel exported alone
(today's single-index graph) against the two-channel graph, plain and with SSD or DPP; in process
(the SavedModel's session) and over gRPC (fgr-serve, one stream).

`--mode=stages` says where the merged call's time goes: the two-channel graph is built in process
and cut after each stage (towers, searches, merge, re-ranking), and each cut is timed at batch 1
beside one channel alone, in wall time and in CPU time per call (all of the process's threads).

  python -m bench.channels --mode=quality --output_dir=/tmp/channels
  python -m bench.channels --mode=latency --output_dir=/tmp/channels
  python -m bench.channels --mode=stages --output_dir=/tmp/channels
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

import tensorflow as tf
from absl import flags

from bench import serving_common as common
from bench.fixtures import latency, servers
from cli import launch
from clients.loadtest import driver, request_source
from engine import base, channels, full_graph
from export import channel_exporter, exporter, served_evaluation, version_report
from models import channels as channels_lib
from models.data import schema, sources

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "quality", ["quality", "latency", "stages"], "What to measure.")
flags.DEFINE_string("output_dir", None, "Training runs, exports and reports go here (reused when present).")
flags.DEFINE_integer("num_sessions", 100_000, "Synthetic sessions.")
flags.DEFINE_integer("num_ads", 20_000, "Synthetic catalog size.")
flags.DEFINE_integer("epochs", 3, "Training epochs of each channel.")
flags.DEFINE_string("index", "brute_force", "Index backend of every channel.")
flags.DEFINE_integer("k", 50, "Candidates returned per request (the k every coverage is measured at).")
flags.DEFINE_integer("max_examples", 8000, "Test examples judged (after the calibration ones).")
flags.DEFINE_list("ssd_gammas", ["0.1", "0.25", "0.5"], "SSD trade-offs to judge.")
flags.DEFINE_list("dpp_thetas", ["0.3", "0.5", "0.7"], "DPP trade-offs to judge.")
flags.DEFINE_list("diversity_windows", ["10"], "Sliding windows of SSD and DPP to judge.")
flags.DEFINE_integer("channel_depth", 0, "Candidates per channel in the export (0: 2k, the export default).")
flags.DEFINE_float("ssd_gamma", 0.25, "SSD trade-off of the latency runs.")
flags.DEFINE_float("dpp_theta", 0.5, "DPP trade-off of the latency runs.")
flags.DEFINE_integer("calls", 300, "Timed batch-1 calls per variant and round (in process).")
flags.DEFINE_integer("rounds", 4, "Rounds of the side-by-side latency comparison.")
flags.DEFINE_float("warmup_seconds", 1.0, "Unmeasured lead-in of each gRPC round.")
flags.DEFINE_float("seconds", 5.0, "Measured seconds of each gRPC round.")
flags.mark_flag_as_required("output_dir")

MODEL_SINGLE, MODEL_CHANNELS = "single", "channels"


def _run(module: str, *args: str) -> str:
  """Runs one of our CLIs in a subprocess (its own TF runtime); returns its last stdout line."""
  command = [sys.executable, "-m", module, *args]
  out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
  return out.strip().splitlines()[-1]


def prepare() -> dict[str, str]:
  """Trains both channels and exports them, together and the efficiency channel alone (reused if present)."""
  out = FLAGS.output_dir
  run = os.path.join(out, "run")
  if channels_lib.read_channels(run) is None:
    _run(
      "models.train_cli",
      f"--output_dir={run}",
      "--channels=semantic,efficiency",
      f"--num_sessions={FLAGS.num_sessions}",
      f"--num_ads={FLAGS.num_ads}",
      f"--num_users={max(1000, FLAGS.num_sessions // 20)}",
      f"--epochs={FLAGS.epochs}",
    )
  paths = {
    MODEL_CHANNELS: os.path.join(out, "models", MODEL_CHANNELS),
    MODEL_SINGLE: os.path.join(out, "models", MODEL_SINGLE),
  }
  checkpoints = {MODEL_CHANNELS: run, MODEL_SINGLE: channels_lib.channel_dir(run, channels_lib.EFFICIENCY)}
  for name, path in paths.items():
    if not os.path.isdir(path) or not any(v.isdigit() for v in os.listdir(path)):
      # fgr-export refuses --channel_depth for the single channel's run, which it would not use.
      depth = [f"--channel_depth={FLAGS.channel_depth}"] if name == MODEL_CHANNELS else []
      _run(
        "export.export_cli",
        f"--checkpoint_dir={checkpoints[name]}",
        f"--model_base_path={path}",
        f"--index={FLAGS.index}",
        f"--k={FLAGS.k}",
        *depth,
      )
  return {name: common.latest_version(path) for name, path in paths.items()}


def quality(versions: dict[str, str]) -> dict[str, Any]:
  """Every knob setting of the channel graph, judged on the same test examples."""
  path = versions[MODEL_CHANNELS]
  report = version_report.read(path)
  settings = served_evaluation.variants(report)
  defaults = settings.pop("merged_ssd"), settings.pop("merged_dpp")
  for window in FLAGS.diversity_windows:
    for gamma in FLAGS.ssd_gammas:
      settings[f"merged_ssd_w{window}_gamma{gamma}"] = {**defaults[0], "gamma": float(gamma), "window": int(window)}
    for theta in FLAGS.dpp_thetas:
      settings[f"merged_dpp_w{window}_theta{theta}"] = {**defaults[1], "theta": float(theta), "window": int(window)}
  source = sources.open_source(sources.DataSpec.from_json(report.data))
  result = served_evaluation.evaluate_version(path, source, FLAGS.max_examples, settings=settings)
  v = result["variants"]
  semantic, efficiency, merged = v[channels_lib.SEMANTIC], v[channels_lib.EFFICIENCY], v["merged"]
  checks = {
    "merged_conversion_minus_efficiency": round(merged["conversion_coverage"] - efficiency["conversion_coverage"], 4),
    "merged_noise_minus_semantic": round(merged["noise_ratio"] - semantic["noise_ratio"], 4),
    "merged_revenue_over_semantic": round(merged["revenue_per_query"] / semantic["revenue_per_query"], 4),
    "merged_revenue_over_efficiency": round(merged["revenue_per_query"] / efficiency["revenue_per_query"], 4),
  }
  for name, point in v.items():
    if name.startswith("merged_"):
      checks[f"{name}_ilad@50_gain"] = round(point["ilad@50"] / merged["ilad@50"] - 1, 4)
      checks[f"{name}_click_coverage_loss"] = round(1 - point["click_coverage"] / merged["click_coverage"], 4)
  return {"evaluation": result, "checks": checks}


def _requests(versions: dict[str, str], count: int) -> dict[str, list]:
  """Batch-1 PredictRequests per variant: the same held-out queries, with each variant's knobs."""
  run = channels_lib.channel_dir(os.path.join(FLAGS.output_dir, "run"), channels_lib.EFFICIENCY)
  queries = request_source.synthetic_requests(count, run)
  defaults = version_report.read(versions[MODEL_CHANNELS]).extra[channel_exporter.CHANNEL_DEFAULTS]
  out = {"single index": request_source.with_model_spec(queries, MODEL_SINGLE, full_graph.SERVING_DEFAULT, None)}
  for method in channels.DIVERSITY_METHODS:
    label = "two channels" + ("" if method == "none" else f" + {method.upper()}")
    requests = request_source.with_model_spec(queries, MODEL_CHANNELS, full_graph.SEARCH_WITH_OPTIONS, None)
    knobs = channels.option_inputs(
      {**defaults, "diversity": method, "gamma": FLAGS.ssd_gamma, "theta": FLAGS.dpp_theta}
    )
    for request in requests:
      for name, value in knobs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    out[label] = requests
  return out


def _in_process(versions: dict[str, str], requests: dict[str, list]) -> dict[str, dict[str, float]]:
  """Batch-1 latency of each variant's signature in this process, rounds alternating the order."""
  base.backend(FLAGS.index).load_ops()
  loaded = {name: tf.saved_model.load(path) for name, path in versions.items()}
  calls = {}
  for label, batch in requests.items():
    model = loaded[batch[0].model_spec.name]
    signature = model.signatures[batch[0].model_spec.signature_name]
    feeds = [{n: tf.constant(tf.make_ndarray(p)) for n, p in r.inputs.items()} for r in batch]
    calls[label] = (signature, feeds)
  samples: dict[str, list[float]] = {label: [] for label in calls}
  labels = list(calls)
  for r in range(FLAGS.rounds + 1):
    for label in labels if r % 2 == 0 else labels[::-1]:
      signature, feeds = calls[label]
      for i in range(FLAGS.calls):
        started = time.perf_counter()
        signature(**feeds[i % len(feeds)])
        if r:  # Round 0 warms up.
          samples[label].append(time.perf_counter() - started)
  return {label: latency.percentiles(values, (50, 99), digits=3) for label, values in samples.items()}


def _stages() -> dict[str, dict[str, float]]:
  """Batch-1 wall p50/p99 and CPU ms per call of each cut of the merged call, built in process."""
  base.backend(FLAGS.index).load_ops()
  run = os.path.join(FLAGS.output_dir, "run")
  built = channel_exporter.build_channel_graph(
    run,
    exporter.ExportConfig(index=FLAGS.index, k=FLAGS.k),
    channel_exporter.ChannelOptions(depth=FLAGS.channel_depth),
  )
  graph = built.graph
  alone = next(c for c in graph.channels if c.channel_name == channels_lib.EFFICIENCY)
  names = list(schema.query_specs())

  def encode(channel, features):
    return channel.query_tower({n: features[n] for n in names})

  def options(method):
    return channels.option_inputs({**graph.defaults.to_json(), "diversity": method, "gamma": FLAGS.ssd_gamma})

  cuts = {
    "one channel: tower, search, ids": lambda f: tf.gather(
      tf.convert_to_tensor(graph.item_ids), tf.maximum(alone.index.search(encode(alone, f), FLAGS.k).indices, 0)
    ),
    "two towers": lambda f: [encode(c, f) for c in graph.channels],
    "two towers and searches": lambda f: [c.index.search(encode(c, f), c.depth).indices for c in graph.channels],
    "merged": lambda f: graph.retrieve(f, options("none")),
    "merged + SSD": lambda f: graph.retrieve(f, options("ssd")),
    "merged + DPP": lambda f: graph.retrieve(f, options("dpp")),
  }
  functions = {
    label: tf.function(lambda cut=cut, **f: cut(f)).get_concrete_function(**schema.query_specs())
    for label, cut in cuts.items()
  }
  queries = request_source.synthetic_requests(200, channels_lib.channel_dir(run, channels_lib.EFFICIENCY))
  feeds = [{n: tf.constant(tf.make_ndarray(p)) for n, p in r.inputs.items()} for r in queries]
  wall: dict[str, list[float]] = {label: [] for label in functions}
  cpu: dict[str, list[float]] = {label: [] for label in functions}
  labels = list(functions)
  for r in range(FLAGS.rounds + 1):
    for label in labels if r % 2 == 0 else labels[::-1]:
      function = functions[label]
      cpu_started = time.process_time()
      for i in range(FLAGS.calls):
        started = time.perf_counter()
        function(**feeds[i % len(feeds)])
        if r:  # Round 0 warms up (and compiles the XLA clusters).
          wall[label].append(time.perf_counter() - started)
      if r:
        cpu[label].append((time.process_time() - cpu_started) / FLAGS.calls)
  out = {}
  for label in labels:
    cpu_ms = sorted(cpu[label])[len(cpu[label]) // 2] * 1e3  # The median round.
    out[label] = {**latency.percentiles(wall[label], (50, 99), digits=3), "cpu_ms_per_call": round(cpu_ms, 3)}
  return out


def _over_grpc(versions: dict[str, str], requests: dict[str, list]) -> list[dict[str, Any]]:
  """Batch-1 latency through fgr-serve, one stream, each variant in turn."""
  workdir = common.workdir(FLAGS.output_dir, "channels_latency")
  with contextlib.ExitStack() as stack:
    served = {
      name: stack.enter_context(servers.fgr_serve(workdir, name, os.path.dirname(path), name=f"fgr-serve-{name}"))
      for name, path in versions.items()
    }
    variants = [
      common.Variant(
        label,
        lambda address=served[batch[0].model_spec.name].address: driver.GrpcPredictTarget(address),
        batch,
        servers=(served[batch[0].model_spec.name],),
      )
      for label, batch in requests.items()
    ]
    return common.compare(variants, common.closed_loop(1), FLAGS.rounds)


def main(argv: list[str]) -> None:
  del argv
  versions = prepare()
  if FLAGS.mode == "quality":
    data = quality(versions)
    rows = [{"variant": name, **point} for name, point in data["evaluation"]["variants"].items()]
    columns = [
      ("variant", "variant"),
      ("click_coverage", "click cov."),
      ("conversion_coverage", "conv. cov."),
      ("noise_ratio", "noise"),
      ("revenue_per_query", "revenue/query"),
      ("ilad@10", "ILAD@10"),
      ("ilad@50", "ILAD@50"),
      ("categories@50", "categories@50"),
    ]
    common.finish(FLAGS.output_dir, "channels_quality", data, [], data["checks"])
    print(common.table(rows, columns))
    return
  if FLAGS.mode == "stages":
    stages = _stages()
    alone = stages["one channel: tower, search, ids"]
    ratios = {
      label: {
        "p50_over_one_channel": round(v["p50_ms"] / alone["p50_ms"], 3),
        "cpu_over_one_channel": round(v["cpu_ms_per_call"] / alone["cpu_ms_per_call"], 3),
      }
      for label, v in stages.items()
    }
    common.finish(FLAGS.output_dir, "channels_stages", {"stages": stages, "ratios": ratios}, [], ratios)
    rows = [{"stage": label, **v, **ratios[label]} for label, v in stages.items()]
    columns = [
      ("stage", "cut after"),
      ("p50_ms", "p50 ms"),
      ("p99_ms", "p99 ms"),
      ("cpu_ms_per_call", "CPU ms/call"),
      ("p50_over_one_channel", "p50 × one channel"),
      ("cpu_over_one_channel", "CPU × one channel"),
    ]
    print(common.table(rows, columns))
    return
  requests = _requests(versions, 200)
  local = _in_process(versions, requests)
  remote = _over_grpc(versions, requests)
  single_local = local["single index"]["p50_ms"]
  single_remote = next(p for p in remote if p["variant"] == "single index")["p50_ms"]
  ratios = {
    "in_process_p50_over_single": {label: round(v["p50_ms"] / single_local, 3) for label, v in local.items()},
    "grpc_p50_over_single": {p["variant"]: round(p["p50_ms"] / single_remote, 3) for p in remote},
  }
  common.finish(
    FLAGS.output_dir, "channels_latency", {"in_process": local, "grpc": remote, "ratios": ratios}, remote, ratios
  )
  print(json.dumps(local))


if __name__ == "__main__":
  launch.run_module(main)
