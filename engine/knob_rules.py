"""The rules the channel graph's knobs must meet: one set, for the export's defaults and every request.

fgr-export fixes the knobs `serving_default` uses, and `search_with_options` takes the same knobs
per request. Each rule is written once, as an elementwise predicate built from comparisons and
`&` only, which NumPy arrays and TF tensors evaluate alike (NaN fails every comparison, so it fails
every rule). `check` applies the rules to export-time values (ValueError); `assertion` builds the
graph assert a request fails with INVALID_ARGUMENT. A default the export accepts is then one the
graph accepts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Rule:
  """One condition on a knob.

  Attributes:
    knob: the knob's name, as a field of `engine.channels.Defaults`.
    dtype: the type a request carries it in (np.float32 or np.int32). Export-time values are cast to
      it before they are judged, so a float64 default that overflows float32 is judged as the graph
      will see it.
    message: what the knob must be; an error adds the value it got.
    holds: elementwise predicate of a NumPy array or a TF tensor of the knob.
    some: the rule holds when some element holds it (otherwise every element must).
    methods: the diversity methods that use the knob: a request with another method is not checked on
      it. Empty: every request uses it.
  """

  knob: str
  dtype: type
  message: str
  holds: Callable[[Any], Any]
  some: bool = False
  methods: tuple[str, ...] = ()


def _finite_non_negative(x: Any) -> Any:
  return (x >= 0) & (x < np.inf)


WEIGHTS = Rule(
  "weights", np.float32, "channel weights must be finite numbers >= 0, one per channel", _finite_non_negative
)
# TF flushes float32 subnormals to 0 (its kernels run with flush-to-zero), so the graph would take
# weights of 1e-40 and 0 for all zeros: a positive weight means one of float32's normal numbers.
_SMALLEST_WEIGHT = float(np.finfo(np.float32).tiny)
SOME_WEIGHT = Rule(
  "weights",
  np.float32,
  # No quote in a message: the graph's Assert C-escapes its strings, so a client read "channel\'s".
  f"some channel weight must be > 0 (at least the smallest normal float32, ~{_SMALLEST_WEIGHT:.3g})",
  lambda w: w >= _SMALLEST_WEIGHT,
  some=True,
)
DEPTHS = Rule("depths", np.int32, "channel depths must be 0 or more", lambda d: d >= 0)
SOME_DEPTH = Rule(
  "depths", np.int32, "channel depths must ask at least one channel for candidates", lambda d: d > 0, some=True
)
MIN_RELEVANCE = Rule("min_relevance", np.float32, "min_relevance must be in [0, 1]", lambda m: (m >= 0) & (m <= 1))
WINDOW = Rule("window", np.int32, "diversity window must be >= 1", lambda w: w >= 1, methods=("ssd", "dpp"))
GAMMA = Rule("gamma", np.float32, "ssd gamma must be a finite number >= 0", _finite_non_negative, methods=("ssd",))
THETA = Rule("theta", np.float32, "dpp theta must be in [0, 1)", lambda t: (t >= 0) & (t < 1), methods=("dpp",))

CHANNEL_RULES = (WEIGHTS, SOME_WEIGHT, DEPTHS, SOME_DEPTH, MIN_RELEVANCE)
DIVERSITY_RULES = (WINDOW, GAMMA, THETA)
RULES = CHANNEL_RULES + DIVERSITY_RULES


def depth_cap(exported: Sequence[int]) -> Rule:
  """The rule that a request asks each channel for at most its exported depth `exported[c]`."""
  cap = np.asarray(exported, np.int32)
  return Rule(
    "depths",
    np.int32,
    f"channel depths must be at most the depth each channel was exported with, {list(exported)}",
    lambda d: d <= cap,
  )


def check(values: Mapping[str, Any], rules: Iterable[Rule] = RULES, partial: bool = False) -> None:
  """Raises ValueError naming the first rule an export-time value breaks.

  Args:
    values: knob values by `Rule.knob`; a rule whose knob is missing is skipped. A mapping value (the
      weights by channel name) is judged on its values and shown as is.
    rules: the rules to apply. Every rule is applied whatever the diversity method, since a request
      may switch the method and keep the default knobs (fgr-eval's ssd and dpp variants do).
    partial: the values are only some of the channels' (the others still to be filled in), so rules
      on all of them together (`Rule.some`) are left to the full check.
  """
  for rule in rules:
    if rule.knob not in values or (partial and rule.some):
      continue
    value = values[rule.knob]
    elements = list(value.values()) if isinstance(value, Mapping) else value
    try:
      with np.errstate(over="ignore"):  # A float overflows to inf, as in the graph: judged below.
        elements = np.asarray(elements, dtype=rule.dtype)
    except OverflowError:  # An integer out of int32's range, which no request can carry.
      raise ValueError(f"{rule.knob} must fit in {np.dtype(rule.dtype).name}; got {value}") from None
    held = np.asarray(rule.holds(elements), bool)
    if not (held.any() if rule.some else held.all()):
      raise ValueError(f"{rule.message}; got {value}")


def assertion(rule: Rule, value: tf.Tensor, skip: tf.Tensor | None = None) -> tf.Operation:
  """The graph assert of `rule` on a request's `value`: INVALID_ARGUMENT when it fails.

  Args:
    skip: bool scalar, True when the request does not use the knob (its diversity method is not
      among `rule.methods`); None: always checked.
  """
  held = rule.holds(tf.cast(value, tf.dtypes.as_dtype(rule.dtype)))
  held = tf.reduce_any(held) if rule.some else tf.reduce_all(held)
  if skip is not None:
    held = tf.logical_or(skip, held)
  # summarize: show every element of the knob (at most one per channel), not TF's first 3.
  return tf.debugging.Assert(held, [f"{rule.message}; got", value], summarize=64, name=f"check_{rule.knob}")
