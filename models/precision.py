"""The export's default tower precision and XLA setting: the fastest full graph measured per device type.

`bench/model_speed.py` times the full graph (query tower + index) with float32, mixed_bfloat16 and
mixed_float16 towers, each with and without XLA, in one run; the winner for a device type is
recorded here and fgr-export uses it unless told otherwise. A device type nobody measured gets plain
float32 without XLA, which works everywhere.
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


# Measured by bench/model_speed.py; figures and command in docs/benchmarks.md, "Models". On the
# 2-core AVX-512 CPU, float32 without XLA served one query fastest with ScaNN (the export default):
# bfloat16 towers were slower, float16 ones far slower without XLA, and XLA did not pay at batch 1.
MEASURED_FASTEST = {
    "CPU": ServingOptions(precision="float32", jit_compile=False),
}
UNMEASURED = ServingOptions(precision="float32", jit_compile=False)


def device_type() -> str:
  """"GPU" when TensorFlow sees a GPU, else "CPU"."""
  return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def serving_defaults(device: str | None = None) -> ServingOptions:
  """The fastest measured serving options for `device` (default: this machine's device type)."""
  return MEASURED_FASTEST.get(device or device_type(), UNMEASURED)
