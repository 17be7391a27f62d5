"""A new version may add to a model's signatures, never break what the previous version's clients send."""

import os

import pytest
import tensorflow as tf

from export import exporter, signatures


def _save(path: str, inputs: dict[str, tf.TensorSpec], outputs: tuple[str, ...], extra_signature: bool = False) -> str:
  """A SavedModel whose serving_default takes `inputs` and returns `outputs` (float32 [1])."""
  module = tf.Module()

  @tf.function(input_signature=[inputs])
  def serve(features):
    del features
    return {name: tf.ones([1]) for name in outputs}

  named = {"serving_default": serve.get_concrete_function()}
  if extra_signature:
    named["other"] = serve.get_concrete_function()
  tf.saved_model.save(module, path, signatures=named)
  return path


_IDS = tf.TensorSpec([None, None], tf.string, name="ids")
_K = tf.TensorSpec([], tf.int32, name="k")


def test_added_signatures_and_outputs_pass(tmp_path):
  _save(str(tmp_path / "m" / "1"), {"ids": _IDS}, ("scores",))
  new = _save(str(tmp_path / "new"), {"ids": _IDS}, ("scores", "channels"), extra_signature=True)
  signatures.check_compatible(new, str(tmp_path / "m"), 1)
  signatures.check_compatible(new, str(tmp_path / "m"), None)  # A first version has no clients yet.


@pytest.mark.parametrize(
  "inputs,outputs,change",
  [
    ({"ids": _IDS, "k": _K}, ("scores",), "serving_default: input k added (int32[])"),
    ({}, ("scores",), "serving_default: input ids removed"),
    (
      {"ids": tf.TensorSpec([None, 20], tf.string, name="ids")},
      ("scores",),
      "input ids string[None, None] -> string[None, 20]",
    ),
    ({"ids": _IDS}, ("embedding",), "serving_default: output scores removed"),
  ],
)
def test_changes_that_break_clients_are_refused(tmp_path, inputs, outputs, change):
  base_path = str(tmp_path / "m")
  _save(os.path.join(base_path, "3"), {"ids": _IDS}, ("scores",))
  new = _save(str(tmp_path / "new"), inputs or {"other": _K}, outputs)
  with pytest.raises(ValueError, match="break the clients") as raised:
    exporter.check_signatures(new, base_path, exporter.ExportConfig(index="brute_force"))
  assert change in str(raised.value) and "version 3's" in str(raised.value)
  # Asked for, it passes.
  exporter.check_signatures(new, base_path, exporter.ExportConfig(index="brute_force", allow_signature_change=True))


@pytest.mark.parametrize("content", [b"\x0a\xff\xff\xff", b""], ids=["garbage", "empty"])
def test_a_damaged_saved_model_pb_is_named(tmp_path, content):
  """Garbage was protobuf's DecodeError traceback after the whole build; an empty file parsed as a
  SavedModel without signatures, against which any export looked compatible."""
  (tmp_path / "saved_model.pb").write_bytes(content)
  with pytest.raises(ValueError, match=r"saved_model.pb (does not parse as a SavedModel|holds no MetaGraph)"):
    signatures.read_signatures(str(tmp_path))
