"""fgr-query's requests file: one JSON object of features a line, errors naming file and line."""

import pytest
from absl import app

from clients import query_cli


def test_requests_file_errors_name_the_line(tmp_path):
  path = tmp_path / "requests.jsonl"
  path.write_text('{"query_tokens": ["t1"]}\n\n{"user_id": "u1"}\n')
  assert query_cli.read_requests(str(path)) == [{"query_tokens": ["t1"]}, {"user_id": "u1"}]
  for text, message in (
    ('{"user_id": "u1"}\n{not json\n', r"requests.jsonl:2: not JSON \(Expecting property name"),
    ('["t1"]\n', "requests.jsonl:1: a request must be a JSON object of features"),
    ("\n", "holds no requests"),
  ):
    path.write_text(text)
    with pytest.raises(app.UsageError, match=message):
      query_cli.read_requests(str(path))
