"""setup.py: every console script resolves, and `pip install .` carries the native module a checkout built."""

from __future__ import annotations

import fnmatch
import importlib
import os
import runpy

import pytest
import setuptools

import serving.native
from serving.native import build

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_kwargs():
  """What setup.py passes to setuptools.setup, without building anything."""
  captured = {}
  original = setuptools.setup
  setuptools.setup = lambda **kwargs: captured.update(kwargs)
  try:
    runpy.run_path(os.path.join(REPO_ROOT, "setup.py"))
  finally:
    setuptools.setup = original
  return captured


def test_every_console_script_names_a_callable(setup_kwargs):
  for script in setup_kwargs["entry_points"]["console_scripts"]:
    name, _, target = (part.strip() for part in script.partition("="))
    module, _, attribute = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute)), name


def test_the_native_module_is_package_data(setup_kwargs):
  """Only .py files were installed: a `pip install .` of a checkout where `make install` had built
  the module served on the Python path only (--native=on refused to start), with no way to build it."""
  assert "serving.native" in setup_kwargs["packages"]
  patterns = setup_kwargs["package_data"]["serving.native"]
  assert any(fnmatch.fnmatch(build.MODULE_NAME + build.ext_suffix(), pattern) for pattern in patterns)


def test_an_install_without_the_sources_is_not_told_to_build_it_there(monkeypatch):
  """`python -m serving.native.build` needs the checkout's C++ sources, which an install lacks."""
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(os.path, "isdir", lambda path: False)
  module, reason = serving.native._load()
  assert module is None
  assert reason == "not built: build it in the checkout (`make install`), then install from there"
