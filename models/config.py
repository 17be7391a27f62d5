"""Hyper-parameters of the towers, saved next to each checkpoint so export rebuilds the same model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import tensorflow as tf

from models.data.json_files import read_json_object

CONFIG_FILE = "config.json"
# What a `fgr-train --channels` run writes at its top, last (`models.channels`).
CHANNELS_FILE = "channels.json"
CHECKPOINT_DIR = "checkpoints"
# config.json's entry recording the run's state: {"state": "training", ...} until train() returns,
# then {"state": "finished", "report": ...}.
RUN = "run"
IN_PROGRESS = "training"
FINISHED = "finished"
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass
class TowerConfig:
  """Shape of the query and item towers.

  Attributes:
    embedding_dim: width of every id/token embedding.
    output_dim: width of the L2-normalised embeddings the index searches.
    hidden_units: MLP layer widths above the features, in both towers.
    id_buckets: hash buckets of the ad id embedding (unseen ids hash into it too).
    token_buckets: hash buckets shared by query tokens, bidword tokens and profile tokens.
    user_buckets: hash buckets of the user id embedding.
    side_buckets: hash buckets of categories and brands.
    sequence_pooling: "attention" (target attention over the behaviour sequence) or "mean".
    temperature: softmax temperature of the in-batch retrieval loss.
    attention: "dot" (scaled dot-product) or "din" (DIN's MLP attention unit).
    side_info: "separate" encodes the side-info sequence (categories, brands) apart from the id
      sequence and adds the two with a residual; "summed" attends over id + category + brand.
    features: "full" towers; "text" (the query's tokens <-> the ad's tokens, category and brand:
      what the query says, nothing about who asks; the semantic channel's towers); or "ids_only"
      (user id <-> item id embeddings, the TFRS basic tutorial's model, kept as the baseline).
    precision: "float32", "mixed_bfloat16" or "mixed_float16": the towers compute in that dtype
      while variables and the output embeddings stay float32.
    id_dropout: in training, the share of positives whose id embedding the item tower zeroes, so
      it learns to place an ad from side info alone, as it must for ads that never appeared in
      training (whose hashed id embeddings are untrained, near-zero vectors).
    sequence_encoder: "self_attention" re-encodes the behaviour sequence with transformer blocks
      (`layers.SequenceEncoder`) and adds its most recent position to the query; "none" does not.
      Off by default: on time-ordered data without queries it gains, but it lowers the recall of
      ads held out of training (docs/performance.md, "Model quality").
    sequence_layers, sequence_heads: blocks and heads of that encoder.
    max_history: most recent behaviours the encoder reads; a longer served sequence is cut.
    attention_target: what target attention looks for: "query" (the query tokens' embedding) or
      "query_and_latest" (the query and the encoded most recent behaviour, so a request without a
      query still attends to what the user did last).
    use_user_id: embed the user id. Off, the query tower generalises to users it never saw in
      training, who are most of a time-ordered test period's users.
    sequence_dropout: dropout of the sequence encoder, in training.
    objective: what a positive is worth in the loss. "clicks": every click alike. "relevance":
      clicks, plus an auxiliary loss that pushes each query's in-batch candidates of another
      category below those of its own (`relevance_weight`), so relevance is a hard constraint
      (the semantic channel). "value": each click weighted by (1 + conversion_weight if it
      converted) * bid ** bid_exponent, normalised to mean 1 in the batch (the efficiency channel);
      the examples must carry "converted" and "bid".
    relevance_weight, conversion_weight, bid_exponent: see `objective`.
  """

  embedding_dim: int = 64
  output_dim: int = 64
  hidden_units: tuple[int, ...] = (256, 128)
  id_buckets: int = 100_000
  token_buckets: int = 50_000
  user_buckets: int = 50_000
  side_buckets: int = 10_000
  sequence_pooling: str = "attention"
  temperature: float = 0.05
  attention: str = "dot"
  side_info: str = "separate"
  features: str = "full"
  precision: str = "float32"
  id_dropout: float = 0.0
  sequence_encoder: str = "none"
  sequence_layers: int = 2
  sequence_heads: int = 2
  max_history: int = 50
  attention_target: str = "query"
  use_user_id: bool = True
  sequence_dropout: float = 0.1
  objective: str = "clicks"
  relevance_weight: float = 1.0
  conversion_weight: float = 4.0
  bid_exponent: float = 1.0

  def __post_init__(self):
    self.hidden_units = tuple(self.hidden_units)
    # Widths and bucket counts of 0 or less reach oneDNN, which aborted the process (status 134)
    # at the first step on --output_dim=0; each is refused here naming its fgr-train flag.
    for name in _POSITIVE_INTS:
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be 1 or more, got {getattr(self, name)}")
    if any(units < 1 for units in self.hidden_units):
      raise ValueError(f"--hidden_units must all be 1 or more, got {list(self.hidden_units)}")
    if not 0.0 <= self.id_dropout < 1.0:
      raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
    for name, allowed in _CHOICES.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    # NaN too: a NaN temperature would train a NaN checkpoint; an infinite one scales every logit
    # to 0, so the loss is constant and the towers learn nothing.
    if not (self.temperature > 0 and math.isfinite(self.temperature)):
      finite = "" if math.isnan(self.temperature) or self.temperature <= 0 else " and finite"
      raise ValueError(f"temperature must be above 0{finite}, got {self.temperature}")
    for name in ("relevance_weight", "conversion_weight", "bid_exponent"):
      # NaN passed "< 0" and was written to config.json as NaN, which is not JSON.
      if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
        raise ValueError(f"--{name} must be a finite number, 0 or more, got {getattr(self, name)}")
    if self.attention_target == "query_and_latest" and self.sequence_encoder == "none":
      raise ValueError("attention_target='query_and_latest' needs sequence_encoder='self_attention'")
    if self.sequence_encoder != "none":
      if self.sequence_layers < 1 or self.max_history < 1 or not 0.0 <= self.sequence_dropout < 1.0:
        raise ValueError("the sequence encoder needs sequence_layers >= 1, max_history >= 1, dropout in [0, 1)")
      if self.sequence_heads < 1 or self.embedding_dim % self.sequence_heads:
        raise ValueError(f"sequence_heads ({self.sequence_heads}) must divide embedding_dim ({self.embedding_dim})")

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> TowerConfig:
    """Reads a config.json "tower" entry; fields older runs did not write get their old meaning."""
    return cls(**{**_LEGACY_VALUES, **value})


_POSITIVE_INTS = ("embedding_dim", "output_dim", "id_buckets", "token_buckets", "user_buckets", "side_buckets")
_CHOICES = {
  "sequence_pooling": ("attention", "mean"),
  "attention": ("dot", "din"),
  "side_info": ("separate", "summed"),
  "features": ("full", "text", "ids_only"),
  "precision": PRECISIONS,
  "sequence_encoder": ("none", "self_attention"),
  "attention_target": ("query", "query_and_latest"),
  "objective": ("clicks", "relevance", "value"),
}
# Runs written before a field existed were trained with these towers, so restore must rebuild them.
_LEGACY_VALUES = {"side_info": "summed", "sequence_encoder": "none", "attention_target": "query"}


def parse_hidden_units(values: list[str]) -> tuple[int, ...]:
  """--hidden_units as integers; a value that is not one is refused naming the flag (TowerConfig checks the range)."""
  try:
    return tuple(int(value) for value in values)
  except ValueError:
    raise ValueError(f"--hidden_units must be a comma-separated list of integers, got {','.join(values)!r}") from None


class AlreadyTrained(ValueError):
  """The output_dir holds a finished run of the config being trained."""


def run_config_json(tower: TowerConfig, data: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
  """The config.json content of a run, as read back from JSON (tuples become lists)."""
  return json.loads(json.dumps({"tower": dataclasses.asdict(tower), "data": data, "training": training}))


def run_is_finished(config: dict[str, Any]) -> bool:
  """Whether a config.json (as read) describes a finished run.

  Only an explicit "run": {"state": "training"} is unfinished: config.json files written before
  runs recorded their state have no "run" entry, and were written by runs that are done.
  """
  return (config.get(RUN) or {}).get("state") != IN_PROGRESS


def check_output_dir(output_dir: str) -> None:
  """Refuses an --output_dir that names an existing file, before any data is read."""
  if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
    raise ValueError(f"--output_dir {output_dir} is a file, not a directory")


def check_writable(output_dir: str) -> None:
  """Creates output_dir (empty, it is no run) and refuses it unless a file can be written there.

  A read-only or unreachable --output_dir failed only when TensorBoard opened its writer, after
  the data was read and counted, with a TensorFlow traceback.
  """
  probe = os.path.join(output_dir, f".fgr-write-check-{os.getpid()}")
  try:
    tf.io.gfile.makedirs(output_dir)
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    reason = e.message if isinstance(e, tf.errors.OpError) else (e.strerror or str(e))
    raise ValueError(f"--output_dir {output_dir} cannot be written: {reason.splitlines()[0]}") from None


def check_run_dir(output_dir: str, config: dict[str, Any]) -> dict[str, Any] | None:
  """What output_dir holds for a run of `config` (`run_config_json`); refuses what training must not touch.

  Training over a run of another config would replace its checkpoints with towers of another
  shape, and training over a finished run would replace the weights fgr-export publishes, so both
  are refused. A config.json beside no checkpoint (a run that failed before its first one, written
  before config.json waited for it) is no run.

  Returns:
    None for a new run; the "run" entry (its progress) of an unfinished run of the same config,
    which training then continues.
  """
  check_output_dir(output_dir)
  path = os.path.join(output_dir, CONFIG_FILE)
  if not tf.io.gfile.exists(path) or not tf.io.gfile.glob(os.path.join(output_dir, CHECKPOINT_DIR, "*.index")):
    return None
  existing = read_json_object(path)
  differences = [
    f"{section}.{key}: {old.get(key)!r} there, {new.get(key)!r} now"
    for section in sorted((set(existing) | set(config)) - {RUN})
    for old, new in [(existing.get(section) or {}, config.get(section) or {})]
    for key in sorted(set(old) | set(new))
    if old.get(key) != new.get(key)
  ]
  if differences:
    raise ValueError(
      f"{output_dir} holds a training run of another config ({'; '.join(differences)}); pass another --output_dir"
    )
  if run_is_finished(existing):
    raise AlreadyTrained(f"{output_dir} holds a run of this config that is already trained; pass another --output_dir")
  return existing[RUN]


def write_run_config(
  output_dir: str,
  tower: TowerConfig,
  data: dict[str, Any],
  training: dict[str, Any],
  run: dict[str, Any] | None = None,
) -> None:
  """Writes config.json describing the towers, the data and the training run.

  Written to a temporary file and renamed, so a crash never leaves a truncated config.json, and a
  reader sees the config and the run's state ("run": {"state": "training" or "finished", ...})
  change together.
  """
  tf.io.gfile.makedirs(output_dir)
  path = os.path.join(output_dir, CONFIG_FILE)
  content = run_config_json(tower, data, training)
  if run is not None:
    content[RUN] = run
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    json.dump(content, f, indent=2)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def read_run_config(output_dir: str) -> dict[str, Any]:
  """Reads config.json back; the "tower" entry is returned as a `TowerConfig`."""
  path = os.path.join(output_dir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    channels_path = os.path.join(output_dir, CHANNELS_FILE)
    if tf.io.gfile.exists(channels_path):
      # A directory fgr-train wrote too: "is it the --output_dir of fgr-train?" sent the user astray.
      names = read_json_object(channels_path, ("channels",))["channels"]
      runs = ", ".join(os.path.join(output_dir, name) for name in names)
      raise FileNotFoundError(
        f"{output_dir} is a `fgr-train --channels` run: each channel's run has a directory of its own ({runs}); "
        "fgr-eval --model_path judges them merged, in a version fgr-export wrote"
      )
    raise FileNotFoundError(f"{path} not found: is {output_dir} the --output_dir of fgr-train?")
  config = read_json_object(path, ("tower", "data", "training"))
  config["tower"] = TowerConfig.from_json(config["tower"])
  return config
