"""Fuzzing a live fgr-serve with 20,000 mutated PredictRequests.

A seeded mutator starts from valid requests for every test model and changes
dtypes, shapes, aliases, tensor bytes, typed values, model specs and output
filters; a fifth of the requests go out as truncated or bit-flipped
serialized protos through a generic channel call. The server must answer
each one, with a status TF Serving could give, and keep serving.
"""

import collections
import random
import time

import grpc
import numpy as np
import serving_testlib as lib
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

NUM_REQUESTS = 20_000
OUTSTANDING = 32
SEED = 7

# What a malformed, unknown or oversized request may be answered with.
# UNKNOWN (an unhandled exception in a handler) and INTERNAL (a failure our
# validation should have caught first) are not among them.
ALLOWED = {
  grpc.StatusCode.OK,
  grpc.StatusCode.INVALID_ARGUMENT,
  grpc.StatusCode.NOT_FOUND,
  grpc.StatusCode.FAILED_PRECONDITION,
  grpc.StatusCode.RESOURCE_EXHAUSTED,
  grpc.StatusCode.OUT_OF_RANGE,
}

_DTYPES = [v for v in types_pb2.DataType.values() if 0 < v < 100] + [0, 150, 12345]
_SIZES = [-7, -1, 0, 1, 2, 3, 8, 1 << 31, 10**12]


def _seeds():
  """Valid requests, one per model and signature."""

  def request(model, alias, value, dtype, signature=""):
    r = predict_pb2.PredictRequest()
    r.model_spec.name = model
    r.model_spec.signature_name = signature
    r.inputs[alias].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
    return r

  return [
    request(lib.TF1_MODEL, "x", [[2.0], [3.0]], tf.float32),
    request(lib.TF2_MODEL, "x", [1.0, 2.0], tf.float32),
    request(lib.TF2_MODEL, "text", [b"a", b""], tf.string, "echo"),
    request(lib.KERAS_MODEL, "x", [[1.0]], tf.float32),
    request(lib.SCANN_MODEL, "q", lib.SCANN_DATABASE[:2], tf.float32),
  ]


def _mutate_tensor(rng: random.Random, t: tensor_pb2.TensorProto) -> None:
  choice = rng.randrange(7)
  if choice == 0:
    t.dtype = rng.choice(_DTYPES)
  elif choice == 1:
    del t.tensor_shape.dim[:]
    for _ in range(rng.randrange(4)):
      t.tensor_shape.dim.add().size = rng.choice(_SIZES)
  elif choice == 2:
    t.tensor_content = rng.randbytes(rng.randrange(65))
  elif choice == 3:
    t.ClearField("tensor_content")
    t.float_val.extend(rng.choice([0.0, float("nan"), float("inf"), -1e38]) for _ in range(rng.randrange(5)))
  elif choice == 4:
    t.string_val.extend(rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(4)))
  elif choice == 5:
    t.int64_val.extend(rng.randrange(-(2**63), 2**63) for _ in range(3))
    t.half_val.extend(rng.randrange(1 << 16) for _ in range(2))
  else:
    t.tensor_shape.unknown_rank = rng.random() < 0.5
    t.version_number = rng.randrange(-5, 5)


def _mutate(rng: random.Random, r: predict_pb2.PredictRequest) -> None:
  for _ in range(rng.randint(1, 3)):
    choice = rng.randrange(10)
    aliases = list(r.inputs)
    if choice < 5 and aliases:
      _mutate_tensor(rng, r.inputs[rng.choice(aliases)])
    elif choice == 5:
      r.inputs[rng.choice(["x", "q", "text", "", "\x00"])].CopyFrom(
        r.inputs[aliases[0]] if aliases else tensor_pb2.TensorProto()
      )
    elif choice == 6 and aliases:
      del r.inputs[rng.choice(aliases)]
    elif choice == 7:
      r.model_spec.signature_name = rng.choice(
        ["", "echo", "serving_default", "nope", "regress_x_to_y", "classify_x_to_y", "predict_two_outputs"]
      )
    elif choice == 8:
      spec = r.model_spec
      pick = rng.randrange(4)
      if pick == 0:
        spec.version.value = rng.choice([0, 1, 2, 123, -1, 2**62])
      elif pick == 1:
        spec.version_label = rng.choice(["stable", "canary", "nope", ""])
      elif pick == 2:
        spec.name = rng.choice(["", "nope", lib.TF2_MODEL, lib.TF1_MODEL])
      else:
        spec.version.value = 1
        spec.version_label = "stable"  # Both set: invalid.
    else:
      r.output_filter.append(rng.choice(["y", "ids", "nope", "text_out", ""]))


def _raw(rng: random.Random, data: bytes) -> bytes:
  """A truncated or bit-flipped serialized request."""
  if rng.random() < 0.5:
    return data[: rng.randrange(len(data) + 1)]
  flipped = bytearray(data)
  for _ in range(rng.randint(1, 4)):
    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
  return bytes(flipped)


def test_fuzzed_predict_requests(server):
  rng = random.Random(SEED)
  seeds = _seeds()
  raw_predict = server.channel.unary_unary(
    "/tensorflow.serving.PredictionService/Predict", request_serializer=lambda b: b, response_deserializer=lambda b: b
  )
  codes = collections.Counter()
  bad = []
  pending = collections.deque()

  def settle(future, what):
    try:
      future.result()
      code = grpc.StatusCode.OK
    except grpc.RpcError as e:
      code = e.code()
      if code not in ALLOWED:
        bad.append((code, e.details(), what))
    codes[code] += 1

  start = time.monotonic()
  for i in range(NUM_REQUESTS):
    request = predict_pb2.PredictRequest()
    request.CopyFrom(rng.choice(seeds))
    _mutate(rng, request)
    if i % 5 == 0:
      data = _raw(rng, request.SerializeToString())
      future, what = raw_predict.future(data, timeout=30), data[:200]
    else:
      future, what = server.predict.Predict.future(request, timeout=30), request
    pending.append((future, what))
    if len(pending) >= OUTSTANDING:
      settle(*pending.popleft())
  while pending:
    settle(*pending.popleft())
  elapsed = time.monotonic() - start
  print(f"{NUM_REQUESTS} fuzzed requests in {elapsed:.1f}s: { {c.name: n for c, n in codes.items()} }")
  assert sum(codes.values()) == NUM_REQUESTS
  assert not bad, bad[:5]
  assert codes[grpc.StatusCode.OK] > 0
  assert codes[grpc.StatusCode.INVALID_ARGUMENT] > NUM_REQUESTS // 4
  # Still up and right.
  assert server.process.poll() is None
  response = server.predict.Predict(seeds[1], timeout=30)
  np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]), [3.5, 4.0])  # Latest: b = 3.
