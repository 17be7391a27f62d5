"""grpcio's report of an answer it could not send (its client had cancelled the call) is one warning
line in fgr-serve's log, not an error with a traceback that any client could cause at will."""

import logging
import sys

from serving.model_servers import grpc_server


def _record(message: str, exc_info) -> logging.LogRecord:
  return logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "events.py", 80, message, ("/m/Predict",), exc_info)


def test_an_unsent_answer_is_one_warning_line():
  try:
    raise RuntimeError('Failed "execute_batch"')
  except RuntimeError:
    exc_info = sys.exc_info()
  record = _record("ExecuteBatchError raised in core by servicer method [%s]", exc_info)
  assert grpc_server.UnsentAnswerFilter().filter(record)
  assert (record.levelno, record.exc_info) == (logging.WARNING, None)
  assert logging.Formatter().format(record) == (
    "ExecuteBatchError raised in core by servicer method [/m/Predict]: the answer was not sent (the call had "
    "ended, e.g. cancelled by its client)"
  )


def test_other_grpc_errors_keep_their_traceback():
  try:
    raise ValueError("boom")
  except ValueError:
    exc_info = sys.exc_info()
  record = _record("Unexpected [ValueError] raised by servicer method [%s]", exc_info)
  assert grpc_server.UnsentAnswerFilter().filter(record)
  assert (record.levelno, record.exc_info) == (logging.ERROR, exc_info)
  assert "Traceback" in logging.Formatter().format(record)


def test_the_server_filters_grpcio_s_logger(tmp_path):
  import serving_testlib as lib

  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"), native="off")
  try:
    assert any(isinstance(f, grpc_server.UnsentAnswerFilter) for f in logging.getLogger("grpc._cython.cygrpc").filters)
  finally:
    server.stop()
