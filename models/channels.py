"""Recall channels: towers trained from the same logs towards different ends, served side by side.

Search-ads recall runs two channels and merges them without quotas:
- "semantic": the query's text against the ad's text and category, trained on clicks with
  relevance as a constraint (`objective="relevance"`); it keeps candidates relevant to the query
  and carries long-tail traffic.
- "efficiency": the full towers (user, behaviour, query), with each click weighted by its value
  (conversion and bid, `objective="value"`); it recalls what earns on head traffic.

`fgr-train --channels=semantic,efficiency` trains one run per channel under OUTPUT_DIR/<channel>/
and writes OUTPUT_DIR/channels.json last; fgr-export turns such a directory into one SavedModel
with an index per channel (`engine.channels`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import tensorflow as tf

from models.config import CHANNELS_FILE, CONFIG_FILE, TowerConfig, check_output_dir
from models.data.json_files import read_json_object

SEMANTIC = "semantic"
EFFICIENCY = "efficiency"

# What makes each channel what it is; every other field comes from the command line.
PRESETS: dict[str, dict[str, Any]] = {
  SEMANTIC: {"features": "text", "objective": "relevance"},
  EFFICIENCY: {"features": "full", "objective": "value"},
}


def channel_tower(name: str, base: TowerConfig) -> TowerConfig:
  """`base` with the fields that define channel `name`."""
  if name not in PRESETS:
    raise ValueError(f"unknown channel {name!r}; channels are {sorted(PRESETS)}")
  return dataclasses.replace(base, **PRESETS[name])


def parse_channels(names: list[str]) -> list[str]:
  """Checks a --channels list: known names, no repeats, at least one."""
  if not names:
    raise ValueError("--channels needs at least one channel")
  for name in names:
    channel_tower(name, TowerConfig())
  if len(set(names)) != len(names):
    raise ValueError(f"--channels repeats a channel: {names}")
  return list(names)


def write_channels(output_dir: str, names: list[str], reports: dict[str, Any]) -> None:
  """Writes channels.json, which marks output_dir as a set of channel runs (written last)."""
  tf.io.gfile.makedirs(output_dir)
  path = os.path.join(output_dir, CHANNELS_FILE)
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    json.dump({"channels": names, "reports": reports}, f, indent=2)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def read_channels(output_dir: str) -> list[str] | None:
  """The channel names of a `--channels` training directory, or None for a single run."""
  path = os.path.join(output_dir, CHANNELS_FILE)
  if not tf.io.gfile.exists(path):
    return None
  return list(read_json_object(path, ("channels",))["channels"])


def channel_dir(output_dir: str, name: str) -> str:
  return os.path.join(output_dir, name)


def check_single_run_dir(output_dir: str) -> None:
  """Refuses to train a single run into a `--channels` run's directory.

  fgr-export reads such a directory as its channels (channels.json wins), so the single run would
  never be published; an unfinished channels run (a channel's config.json, no channels.json yet)
  is refused too.
  """
  marks = [os.path.join(output_dir, CHANNELS_FILE)]
  marks += [os.path.join(channel_dir(output_dir, name), CONFIG_FILE) for name in PRESETS]
  found = [path for path in marks if tf.io.gfile.exists(path)]
  if found:
    raise ValueError(f"{output_dir} holds a --channels run ({found[0]}); pass another --output_dir")


def check_channels_dir(output_dir: str, names: list[str]) -> None:
  """Refuses to train `--channels=names` into a single run's directory, or over a run of other channels."""
  check_output_dir(output_dir)
  single = os.path.join(output_dir, CONFIG_FILE)
  if tf.io.gfile.exists(single):
    raise ValueError(f"{output_dir} holds a single training run ({single}); pass another --output_dir")
  existing = read_channels(output_dir)
  if existing is not None and existing != names:
    raise ValueError(
      f"{output_dir} holds a --channels run of channels {existing}, not {names}; pass another --output_dir"
    )
