"""Which flags a command line sets: for refusing a flag the run would ignore, naming it."""

from absl import flags


def given(names: tuple[str, ...]) -> str:
  """The flags among `names` that the parsed command line sets, as "--a, --b" ("" for none)."""
  return ", ".join(f"--{name}" for name in names if flags.FLAGS[name].present)
