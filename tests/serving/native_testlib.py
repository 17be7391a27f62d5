"""Helpers of the native data plane's tests: what to do when `make install` did not build it."""

from __future__ import annotations

import os

import pytest


def skip_or_fail_unavailable(message: str) -> None:
  """Skips the test, or fails it in CI (CI=true), where `make install` must have built the native parts."""
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(f"{message}; CI=true, so `make install` must have built it", pytrace=False)
  pytest.skip(message)
