"""The native module's protobuf stays apart from TensorFlow's in one process, in either import order.

TensorFlow loads its libraries RTLD_GLOBAL, and libtensorflow_framework.so.2 exports its own
protobuf (google::protobuf, and the tensorflow:: proto classes) built from another protobuf
release. `_fgr_native` links Debian's libprotobuf 3.21 and compiles the same tensorflow:: classes.
Each check runs in a fresh interpreter that uses TF's protobufs (C++ parsing included), then the
module's (`parse_predict_request` parses and re-serializes a PredictRequest), then TF's again: a
module that bound to TF's copy, or TF to the module's, would crash or answer wrongly. fgr-serve runs
under a preloaded mimalloc (serving/util/allocator.py), so the check runs under it too.

The module is built by `make install`. Without it these tests skip, except in CI (CI=true), where
they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import native_testlib
import pytest

from serving.util import allocator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOT_BUILT = 77  # The child's exit code when serving.native.module() is None.

_CHILD = r"""
import json, os, sys
order = sys.argv[1]

def use_tf_protos(tf):
  # C++ protobuf inside TF: tf.io.parse_example parses Examples with TF's own copy, and a session
  # parses its serialized ConfigProto.
  example = tf.train.Example(features=tf.train.Features(feature={
    "ids": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"ad1", b"ad22"])),
    "score": tf.train.Feature(float_list=tf.train.FloatList(value=[0.25])),
  }))
  parsed = tf.io.parse_example(
    tf.constant([example.SerializeToString()] * 3),
    {"ids": tf.io.VarLenFeature(tf.string), "score": tf.io.FixedLenFeature([1], tf.float32)},
  )
  assert parsed["ids"].values.numpy().tolist() == [b"ad1", b"ad22"] * 3, parsed
  assert parsed["score"].numpy().tolist() == [[0.25]] * 3, parsed
  config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
  config.graph_options.rewrite_options.disable_meta_optimizer = True
  assert tf.compat.v1.ConfigProto.FromString(config.SerializeToString()) == config
  with tf.Graph().as_default() as graph:
    total = tf.reduce_sum(tf.constant([[1.0, 2.0], [3.0, 4.0]]))
    with tf.compat.v1.Session(graph=graph, config=config) as session:
      assert session.run(total) == 10.0
  assert tf.make_ndarray(tf.make_tensor_proto([[1, 2], [3, 4]])).tolist() == [[1, 2], [3, 4]]

def requests(tf, np):
  from tensorflow_serving.apis import predict_pb2
  one = predict_pb2.PredictRequest()
  one.model_spec.name = "retrieval"
  one.model_spec.version.value = 7
  one.model_spec.signature_name = "serving_default"
  one.inputs["query_tokens"].CopyFrom(tf.make_tensor_proto(np.array([[b"t3_1", b"t3_7", b""]])))
  many = predict_pb2.PredictRequest()
  many.CopyFrom(one)
  many.model_spec.ClearField("version")
  many.model_spec.version_label = "stable"
  many.inputs["x"].CopyFrom(tf.make_tensor_proto(np.arange(12, dtype=np.float32).reshape(3, 4)))
  many.inputs["ids"].CopyFrom(tf.make_tensor_proto(np.array([1, -2, 2**40], dtype=np.int64)))
  many.inputs["half"].CopyFrom(tf.make_tensor_proto(np.array([0.5, 1.5], dtype=np.float16)))
  many.inputs["scalar"].CopyFrom(tf.make_tensor_proto(3.5, dtype=tf.float64))
  many.inputs["empty"].CopyFrom(tf.make_tensor_proto(np.zeros((0, 4), dtype=np.int32)))
  many.output_filter.extend(["ids", "scores"])
  return predict_pb2, [one, many]

def round_trip(native, tf, np):
  predict_pb2, messages = requests(tf, np)
  for message in messages:
    data = message.SerializeToString()
    back = native.parse_predict_request(data)
    assert predict_pb2.PredictRequest.FromString(back) == message, (message, back)
    if len(message.inputs) == 1:  # Map order is not fixed, so bytes match only with one entry.
      assert back == data, (data, back)
  try:
    native.parse_predict_request(b"\xff\xff\xff")
  except Exception:
    pass
  else:
    raise AssertionError("garbage parsed as a PredictRequest")
  return len(messages)

def load_native_directly():
  flags = sys.getdlopenflags()
  sys.setdlopenflags(os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
  try:
    from serving.native import _fgr_native
  finally:
    sys.setdlopenflags(flags)
  return _fgr_native

if order == "tf_first":  # What serving.native.module() does: TensorFlow, then the module.
  import numpy as np
  import tensorflow as tf
  import scann  # fgr-serve loads ScaNN's ops into the same process.
  use_tf_protos(tf)
  from serving import native
  module = native.module()
  if module is None:
    print(json.dumps({"reason": native.unavailable_reason()}))
    sys.exit(77)
else:  # The module first, then TensorFlow's RTLD_GLOBAL libraries.
  try:
    module = load_native_directly()
  except ImportError as e:
    print(json.dumps({"reason": str(e)}))
    sys.exit(77)
  import numpy as np
  import tensorflow as tf
  import scann
round_trips = round_trip(module, tf, np)
use_tf_protos(tf)
round_trips += round_trip(module, tf, np)
use_tf_protos(tf)
print(json.dumps({"ok": True, "round_trips": round_trips}))
"""


@pytest.mark.parametrize(
  "order, malloc", [("tf_first", "glibc"), ("native_first", "glibc"), ("tf_first", allocator.MIMALLOC)]
)
def test_protobuf_copies_stay_apart(order, malloc):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("LD_PRELOAD", None)
  if malloc == allocator.MIMALLOC:
    library = allocator.mimalloc_library()
    assert library, "cmeel-mimalloc is an install requirement on Linux"
    env["LD_PRELOAD"] = library
  result = subprocess.run(
    [sys.executable, "-c", _CHILD, order], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  last = result.stdout.strip().splitlines()[-1:] or ["{}"]
  if result.returncode == NOT_BUILT:
    native_testlib.skip_or_fail_unavailable(f"native module unavailable: {json.loads(last[0])['reason']}")
  assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
  assert json.loads(last[0]) == {"ok": True, "round_trips": 4}
