"""The export's default tower precision and XLA setting per device type.

Lower precision and XLA change the serving graph's speed, and which combination wins depends on the
device: `bench/model_speed.py` times the full graph (query tower + index) with float32,
mixed_bfloat16 and mixed_float16 towers, each with and without XLA, side by side. The winner for a
device type is recorded here, and fgr-export uses it unless `--precision`/`--jit_compile` say
otherwise. A device type with no recorded winner gets float32 without XLA, which runs everywhere.
Current figures and the command: docs/performance.md, "Tuning".
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from models import config as config_lib


@dataclasses.dataclass(frozen=True)
class ServingOptions:
  """How to rebuild the towers for serving (`train.restore(..., precision=, jit_compile=)`).

  Attributes:
    precision: one of `config.PRECISIONS`.
    jit_compile: compile the towers' numeric part with XLA.
  """

  precision: str
  jit_compile: bool

  def __post_init__(self):
    if self.precision not in config_lib.PRECISIONS:
      raise ValueError(f"precision must be one of {config_lib.PRECISIONS}, got {self.precision!r}")


# The winner per device type, from bench/model_speed.py (figures: docs/performance.md, "Tuning").
# On CPU it is float32 without XLA: no other combination served a single query faster, and the
# reduced-precision towers also change some of the top-k, so they would cost quality for nothing.
MEASURED_FASTEST = {"CPU": ServingOptions(precision="float32", jit_compile=False)}
UNMEASURED = ServingOptions(precision="float32", jit_compile=False)


def device_type() -> str:
  """ "GPU" when TensorFlow sees a GPU, else "CPU"."""
  return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def serving_defaults(device: str | None = None) -> ServingOptions:
  """The recorded serving options for `device` (default: this machine's device type)."""
  return MEASURED_FASTEST.get(device or device_type(), UNMEASURED)
