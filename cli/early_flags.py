"""Flags a process needs before absl parses its argv (and before TensorFlow loads)."""

from collections.abc import Sequence

from absl import flags


def flag_value(argv: Sequence[str], *names: str) -> str | None:
  """The value of the last `--name=value` or `--name value` in `argv`, or None.

  absl accepts one or two dashes before a flag's name, and the last occurrence
  wins; this reads argv the same way, for settings that must take effect
  before absl runs (the process's malloc, TensorFlow's C++ log level).
  """
  spellings = {prefix + name for name in names for prefix in ("-", "--")}
  value = None
  for i, arg in enumerate(argv):
    flag, equals, rest = arg.partition("=")
    if flag in spellings:
      if equals:
        value = rest
      elif i + 1 < len(argv):
        value = argv[i + 1]
  return value


def bool_flag(argv: Sequence[str], name: str, default: bool) -> bool:
  """The value of boolean flag `name` as absl will parse it from `argv`: the last of `--name`,
  `--noname` and `--name=value` (any value absl's boolean parser takes, e.g. `false`, `F`, `0`).

  A value absl refuses leaves the earlier one: absl will stop the process with its own error.
  """
  value = default
  for arg in argv:
    flag, equals, rest = arg.partition("=")
    if flag in (f"-{name}", f"--{name}"):
      if not equals:
        value = True
        continue
      try:
        value = flags.BooleanParser().parse(rest)
      except ValueError:
        pass
    elif flag in (f"-no{name}", f"--no{name}") and not equals:
      value = False
  return value
