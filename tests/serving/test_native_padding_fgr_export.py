"""pad_variable_length_inputs on an fgr-export graph: the native plane pads as TF Serving (a request's
first element), which those graphs don't read as padding, so loading one that way says so."""

import json

import pytest
import serving_testlib as lib
import tensorflow as tf

from tests import conftest as root_conftest

_WARNING = "is an fgr-export graph, which reads only"


class _Tokens(tf.Module):
  """y = the count of each row's non-"" tokens: "" is padding, as in fgr-export's towers."""

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name="tokens")])
  def serve(self, tokens):
    return {"y": tf.reduce_sum(tf.cast(tokens != "", tf.int32), axis=1)}


@pytest.fixture
def native_on():
  root_conftest.require_native()


def _write(tmp_path, fgr_export: bool) -> None:
  model = _Tokens()
  version = tmp_path / "m" / "1"
  tf.saved_model.save(model, str(version), signatures={"serving_default": model.serve})
  if fgr_export:
    (version / "assets.extra").mkdir()
    (version / "assets.extra" / "export_report.json").write_text(json.dumps({"index": "brute_force"}))


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("fgr_export", [True, False])
def test_padding_an_fgr_export_is_logged_at_load(tmp_path, caplog, fgr_export):
  """It was silent: a 3-token history batched with a 20-token one was answered as if its first item
  repeated 17 times (other ids on every fgr export), and nothing in the log said why."""
  _write(tmp_path, fgr_export)
  batching = "max_batch_size { value: 4 } batch_timeout_micros { value: 1000 } pad_variable_length_inputs: true"
  with caplog.at_level("WARNING"):
    server = lib.batching_server(tmp_path, batching, native="on")
    server.stop()
  warnings = [r.getMessage() for r in caplog.records if _WARNING in r.getMessage()]
  if fgr_export:
    assert len(warnings) >= 1 and "model: m, version: 1" in warnings[0]
  else:
    assert warnings == []
