"""Flags a process needs before absl parses its argv (and before TensorFlow loads)."""

from collections.abc import Sequence


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
