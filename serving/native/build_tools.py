"""What every step of the native build shares: running tools, finding packages, reporting errors."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What provides each tool, header or library the build needs (Debian packages).
APT = {
  "g++": "g++",
  "nm": "binutils",
  "pkg-config": "pkg-config",
  "protoc": "protobuf-compiler",
  "protobuf": "libprotobuf-dev",
  "grpc++": "libgrpc++-dev",
  "pybind11": "pybind11-dev",
  "Python.h": "python3-dev",
}


class BuildError(Exception):
  """The build cannot go on; the message says what to install or fix."""


def log(message: str) -> None:
  print(f"[native build] {message}", flush=True)


def run(command: Sequence[str], what: str) -> str:
  result = subprocess.run(list(command), capture_output=True, text=True)
  if result.returncode != 0:
    raise BuildError(f"{what} failed ({result.returncode}):\n$ {shlex.join(command)}\n{result.stdout}{result.stderr}")
  return result.stdout


def tool(name: str) -> str:
  path = shutil.which(name)
  if not path:
    raise BuildError(f"`{name}` not found: apt-get install {APT[name]}")
  return path


def package_dir(package: str) -> str:
  """A top-level package's directory, found without importing it (importing TensorFlow takes seconds)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise BuildError(f"Python package `{package}` is not installed in {sys.prefix}: run `make install`")
  return list(spec.submodule_search_locations)[0]


def replace_if_changed(source: str, target: str) -> None:
  """Moves source over target unless their bytes are equal, so unchanged files keep their mtime."""
  if os.path.exists(target):
    with open(source, "rb") as a, open(target, "rb") as b:
      if a.read() == b.read():
        os.remove(source)
        return
  os.makedirs(os.path.dirname(target), exist_ok=True)
  os.replace(source, target)
