"""The shared fixtures' own rules: MovieLens tests skip without the data, except in CI where they fail."""

import re

import pytest

from tests import conftest


def test_movielens_found_where_the_data_is(tmp_path):
  (tmp_path / "u.data").write_text("1\t1\t5\t881250949\n")
  assert conftest.find_movielens(str(tmp_path), environ={"CI": "true"}) == str(tmp_path)
  assert conftest.find_movielens(str(tmp_path), environ={}) == str(tmp_path)


@pytest.mark.parametrize("environ", [{}, {"CI": "false"}, {"CI": ""}])
def test_movielens_missing_skips_outside_ci(tmp_path, environ):
  with pytest.raises(pytest.skip.Exception, match=f"not found at {re.escape(str(tmp_path))}"):
    conftest.find_movielens(str(tmp_path), environ=environ)


@pytest.mark.parametrize("value", ["true", "True"])
def test_movielens_missing_fails_in_ci(tmp_path, value):
  with pytest.raises(pytest.fail.Exception, match=f"not found at {re.escape(str(tmp_path))}.*CI=true"):
    conftest.find_movielens(str(tmp_path), environ={"CI": value})


def test_the_fixture_logic_reads_ci_from_the_environment(tmp_path, monkeypatch):
  monkeypatch.setattr(conftest, "MOVIELENS_DIR", str(tmp_path / "ml-100k"))
  monkeypatch.setenv("CI", "true")
  with pytest.raises(pytest.fail.Exception, match="ml-100k"):
    conftest.find_movielens()
  monkeypatch.delenv("CI")
  with pytest.raises(pytest.skip.Exception, match="ml-100k"):
    conftest.find_movielens()
