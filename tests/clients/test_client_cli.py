"""fgr-query and fgr-loadtest as their users run them: one-line errors for mistakes, flags checked."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from clients import query

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_tools(*commands: list[str]) -> list[subprocess.CompletedProcess]:
  """Runs console scripts (`["fgr-query", *flags]`) through cli.launch, side by side; their results in order."""
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        "-c",
        f"import sys; sys.argv[0] = {tool!r}; from cli import launch; launch.{tool.replace('-', '_')}()",
        *args,
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
      cwd=REPO_ROOT,
    )
    for tool, *args in commands
  ]
  results = []
  for command, process in zip(commands, processes):
    stdout, stderr = process.communicate(timeout=300)
    results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
  return results


def test_file_mistakes_end_the_clients_in_one_line(tmp_path):
  """A missing or bad requests file was a Python traceback (each message: test_loadtest.py)."""
  ragged = tmp_path / "ragged.jsonl"
  ragged.write_text('{"text": [["a"], ["b", "c"]]}\n')
  # Nothing listens on port 1: each tool fails on its file before it connects.
  query, loadtest = run_tools(
    ["fgr-query", "--server=127.0.0.1:1", f"--requests_file={tmp_path / 'missing.jsonl'}"],
    ["fgr-loadtest", "--server=127.0.0.1:1", f"--requests_file={ragged}", "--noprogress"],
  )
  for result, line in (
    (query, f"fgr-query: error: cannot read {tmp_path / 'missing.jsonl'}: No such file or directory"),
    (loadtest, f"fgr-loadtest: error: {ragged}:1: feature 'text': nested lists must all have the same length"),
  ):
    assert result.returncode == 1, result.stderr[-3000:]
    assert line in result.stderr.splitlines(), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_answer_rows_keep_top_values_or_all():
  response = predict_pb2.PredictResponse()
  response.outputs["ids"].CopyFrom(tf.make_tensor_proto(np.array([[b"a", b"b", b"c"]], dtype=object)))
  response.outputs["scores"].CopyFrom(tf.make_tensor_proto(np.array([[0.9, 0.5, 0.1]], dtype=np.float32)))
  assert query.answer_row(response, top=2) == {"ids": ["a", "b"], "scores": [0.9, 0.5]}
  assert query.answer_row(response, top=None) == {"ids": ["a", "b", "c"], "scores": [0.9, 0.5, 0.1]}
  with pytest.raises(ValueError, match="top must be >= 1"):
    query.answer_row(response, top=-1)  # It printed empty lists.


def test_fgr_query_refuses_a_negative_top_or_no_timeout():
  top, timeout = run_tools(["fgr-query", "--top=-1"], ["fgr-query", "--timeout=0"])
  assert top.returncode == 1 and "flag --top=-1: -1 is not a non-negative integer" in top.stderr, top.stderr
  assert timeout.returncode == 1 and "--timeout must be more than 0 seconds" in timeout.stderr, timeout.stderr
