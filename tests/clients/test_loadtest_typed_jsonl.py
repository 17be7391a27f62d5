"""fgr-loadtest reads a JSONL requests file as fgr-query does: values typed by the signature, strings filled."""

import json

import numpy as np
import tensorflow as tf
from absl import flags as absl_flags
from absl.testing import flagsaver
from tensorflow.core.protobuf import meta_graph_pb2

from clients import query
from clients.loadtest import loadtest_cli
from tests.serving import serving_testlib as lib


def test_a_float_input_from_jsonl_is_served_as_fgr_query_sends_it(tmp_path):
  """The same file fgr-query answered was sent as string tensors: every request INVALID_ARGUMENT."""
  lib.write_tf2_half_plus_two(str(tmp_path / "m" / "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=str(tmp_path / "m"))
  requests_file = tmp_path / "requests.jsonl"
  requests_file.write_text(json.dumps({"x": 1.5}) + "\n")
  absl_flags.FLAGS(["fgr-loadtest"])
  try:
    with flagsaver.flagsaver(
      server=f"127.0.0.1:{server.server.grpc_port}",
      model_name="m",
      requests_file=str(requests_file),
      mode="closed",
      concurrency=1,
      warmup_seconds=0,
      duration_seconds=600,  # Only an upper bound: the run ends at --max_requests.
      max_requests=3,
      output_prefix=str(tmp_path / "run"),
      progress=False,
    ):
      loadtest_cli.main(["fgr-loadtest"])
  finally:
    server.stop()
  with open(tmp_path / "run.json") as f:
    report = json.load(f)
  assert report["requests"]["ok"] == 3 and report["errors"] == {}, report


def test_a_left_out_string_scalar_is_sent_as_a_scalar():
  """A left-out string knob (`diversity` []) went as [""], refused for its shape without naming the knob."""
  scalar = meta_graph_pb2.TensorInfo(dtype=tf.string.as_datatype_enum)
  inputs = {"diversity": scalar}
  request = query.predict_request(query.complete_features({}, inputs), query.model_spec("m", "s"), inputs)
  value = tf.make_ndarray(request.inputs["diversity"])
  assert value.shape == () and value == np.array(b"", dtype=object)
