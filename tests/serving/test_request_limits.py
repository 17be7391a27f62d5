"""Request-expansion limits and hostile bodies (issue 24, item 3).

One fgr-serve subprocess with default flags (mimalloc, freed memory kept in
the process) serves a small model; hostile requests must be refused from
what they declare, before they are expanded, so they can't leave the
process larger.
"""

import concurrent.futures
import http.client
import json
import time

import grpc
import psutil
import pytest
import serving_testlib as lib
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import classification_pb2, inference_pb2, predict_pb2, regression_pb2

from serving import errors
from serving.batching import batch_scheduler
from serving.servables import request_limits

MODEL = "tokens"


class _Tokens(tf.Module):
  @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
  def serve(self, x):
    return {"y": 0.5 * x + 2.0}

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name="text")])
  def lengths(self, text):
    return {"lengths": tf.reduce_sum(tf.strings.length(text), axis=1)}


@pytest.fixture(scope="module")
def served(tmp_path_factory, native_mode):
  """fgr-serve with default limits: the `tokens` model (x [N] -> y, text
  [N, ?] -> lengths) and TF1 half_plus_two (classify/regress)."""
  tmp = tmp_path_factory.mktemp("limits")
  module = _Tokens()
  tf.saved_model.save(
    module, str(tmp / MODEL / "1"), signatures={"serving_default": module.serve, "lengths": module.lengths}
  )
  lib.write_tf1_half_plus_two(str(tmp / lib.TF1_MODEL / "1"))
  config = tmp / "models.config"
  config.write_text(f"""
model_config_list {{
  config {{ name: "{MODEL}" base_path: "{tmp / MODEL}" }}
  config {{ name: "{lib.TF1_MODEL}" base_path: "{tmp / lib.TF1_MODEL}" }}
}}""")
  proc = lib.ServerProcess([f"--model_config_file={config}", "--rest_api_port=-1"], str(tmp), native=native_mode)
  yield proc
  assert proc.terminate() == 0, proc.stderr()[-3000:]


def _predict(signature="", **inputs):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = MODEL
  request.model_spec.signature_name = signature
  for alias, proto in inputs.items():
    request.inputs[alias].CopyFrom(proto)
  return request


def _declared(dtype, shape, **values):
  """A TensorProto declaring `shape` with only the values given."""
  proto = tensor_pb2.TensorProto(dtype=dtype)
  for size in shape:
    proto.tensor_shape.dim.add(size=size)
  for field, value in values.items():
    if field == "tensor_content":
      proto.tensor_content = value
    else:
      getattr(proto, field).extend(value)
  return proto


def _string_bomb():
  """The report's request: [100000, 50] from one string_val (5M strings)."""
  return _predict("lengths", text=_declared(types_pb2.DT_STRING, [100000, 50], string_val=[b"w" * 40]))


def _rows(n):
  return _predict(x=tf.make_tensor_proto([1.0] * n, dtype=tf.float32))


def _examples(with_context_bytes=0, count=2, model=lib.TF1_MODEL):
  request = classification_pb2.ClassificationRequest()
  request.model_spec.name = model
  request.model_spec.signature_name = "classify_x_to_y"
  if with_context_bytes:
    target = request.input.example_list_with_context
    target.context.features.feature["pad"].bytes_list.value.append(b"c" * with_context_bytes)
  else:
    target = request.input.example_list
  for i in range(count):
    target.examples.add().features.feature["x"].float_list.value.append(i)
  return request


def _context_bomb():
  """1000 examples sharing a 100 kB context: 100 MB once each repeats it."""
  return _examples(with_context_bytes=100_000, count=1000)


def _announce_huge_body(port, path, length=1 << 30):
  """Sends headers for a `length`-byte body (and 1 kB of it); the server
  must answer 413 without reading the rest."""
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  try:
    connection.putrequest("POST", path)
    connection.putheader("Content-Length", str(length))
    connection.endheaders(b"[" * 1024)
    response = connection.getresponse()
    return response.status, json.loads(response.read())
  finally:
    connection.close()


def _nested_lists(depth):
  return ('{"instances": ' + "[" * depth + "1" + "]" * depth + "}").encode()


def _nested_objects(depth):
  return ('{"instances": [' + '{"x": ' * depth + "1" + "}" * depth + "]}").encode()


# --- What each request is answered -----------------------------------------


def test_declared_expansion_over_the_limit_is_resource_exhausted(served):
  code, details = lib.grpc_code(served.predict.Predict, _string_bomb())
  assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
  # Names model, version, signature, the limit and the flag to raise it.
  assert "5000000 elements" in details and "--max_elements_per_request" in (details), details
  assert f"model: {MODEL}, version: 1, signature: lengths" in details
  assert "1048576 elements" in details  # 4096 rows x 256 (unknown inner dim).
  code, details = lib.grpc_code(served.predict.Predict, _rows(20000))
  assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
  assert "4096 elements" in details and "--expansion_limit_rows" in details
  # At the derived limit: served.
  assert lib.grpc_code(served.predict.Predict, _rows(4096))[0] == grpc.StatusCode.OK


def test_malformed_declarations_are_invalid_argument(served):
  cases = {
    "negative": _declared(types_pb2.DT_FLOAT, [-5], float_val=[1.0]),
    "overflow": _declared(types_pb2.DT_FLOAT, [1 << 40, 1 << 40], float_val=[1.0]),
    "content": _declared(types_pb2.DT_FLOAT, [1 << 30], tensor_content=b"\0" * 8),
    # No elements, but a dimension no array can have (NumPy's bytes overflow int64).
    "zero_by_huge": _declared(types_pb2.DT_FLOAT, [0, 1 << 62]),
    "huge_by_zero": _declared(types_pb2.DT_FLOAT, [1 << 62, 0]),
  }
  for name, proto in cases.items():
    code, details = lib.grpc_code(served.predict.Predict, _predict(x=proto))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, details)
  # The same zero-element shapes for an input of that rank, which the native path would decode:
  # both paths refuse a shape whose nonzero dimensions multiply past 2^40, and take one up to it.
  for dims in ([0, 1 << 62], [1 << 62, 0], [0, (1 << 40) + 1]):
    code, details = lib.grpc_code(
      served.predict.Predict, _predict("lengths", text=_declared(types_pb2.DT_STRING, dims))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (dims, details)
    assert "tensor parsing error: text: shape" in details and "is too large" in details, details
  code, details = lib.grpc_code(
    served.predict.Predict, _predict("lengths", text=_declared(types_pb2.DT_STRING, [0, 1 << 40]))
  )
  assert code == grpc.StatusCode.OK, details
  # A large declared shape with one value is over the limit, not malformed.
  code, details = lib.grpc_code(
    served.predict.Predict, _predict(x=_declared(types_pb2.DT_FLOAT, [1 << 26], float_val=[1.0]))
  )
  assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details


def test_examples_context_expansion_over_classify_regress_multi(served):
  code, details = lib.grpc_code(served.predict.Classify, _context_bomb())
  assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
  assert "--max_bytes_per_request" in details and ("signature: classify_x_to_y" in details), details
  regress = regression_pb2.RegressionRequest(input=_context_bomb().input)
  regress.model_spec.name = lib.TF1_MODEL
  regress.model_spec.signature_name = "regress_x_to_y"
  assert lib.grpc_code(served.predict.Regress, regress)[0] == (grpc.StatusCode.RESOURCE_EXHAUSTED)
  multi = inference_pb2.MultiInferenceRequest(input=_context_bomb().input)
  task = multi.tasks.add(method_name="tensorflow/serving/regress")
  task.model_spec.name = lib.TF1_MODEL
  task.model_spec.signature_name = "regress_x_to_y"
  assert lib.grpc_code(served.predict.MultiInference, multi)[0] == (grpc.StatusCode.RESOURCE_EXHAUSTED)
  assert lib.grpc_code(served.predict.Classify, _examples())[0] == grpc.StatusCode.OK


def test_rest_limits_answer_413(served):
  port = served.rest_port
  status, payload = lib.post_json(
    port, f"/v1/models/{MODEL}:predict", json.dumps({"instances": [1.0] * 20000}).encode()
  )
  assert status == 413 and "--max_elements_per_request" in payload["error"]
  assert f"model: {MODEL}, version: 1" in payload["error"]
  status, payload = _announce_huge_body(port, f"/v1/models/{MODEL}:predict")
  assert status == 413 and "--rest_api_max_body_bytes" in payload["error"]
  status, payload = lib.post_json(port, f"/v1/models/{MODEL}:predict", json.dumps({"instances": [1.0, 2.0]}).encode())
  assert status == 200 and payload == {"predictions": [2.5, 3.0]}


@pytest.mark.parametrize(
  "body",
  [
    _nested_lists(10000),
    _nested_objects(10000),
    _nested_lists(900),
    _nested_objects(900),
    b'{"examples": [{"x": ' + b"[" * 900 + b"]" * 900 + b"}]}",
  ],
  ids=["lists", "objects", "lists900", "objects900", "examples"],
)
def test_deeply_nested_json_is_400(served, body):
  verb = "classify" if body.startswith(b'{"examples"') else "predict"
  model = lib.TF1_MODEL if verb == "classify" else MODEL
  status, payload = lib.post_json(served.rest_port, f"/v1/models/{model}:{verb}", body)
  assert status == 400, payload
  assert set(payload) == {"error"}
  # Still healthy.
  status, payload = lib.post_json(served.rest_port, f"/v1/models/{MODEL}:predict", b'{"instances": [1.0]}')
  assert status == 200 and payload == {"predictions": [2.5]}


# --- Memory ---------------------------------------------------------------


def _rss(proc) -> int:
  return psutil.Process(proc.process.pid).memory_info().rss


def _normal_traffic(proc):
  for _ in range(5):
    assert lib.grpc_code(proc.predict.Predict, _rows(64))[0] == grpc.StatusCode.OK
    assert (
      lib.grpc_code(proc.predict.Predict, _predict("lengths", text=(tf.make_tensor_proto([[b"ab", b"cd"]] * 8))))[0]
      == grpc.StatusCode.OK
    )
    assert lib.grpc_code(proc.predict.Classify, _examples())[0] == grpc.StatusCode.OK
    status, _ = lib.post_json(proc.rest_port, f"/v1/models/{MODEL}:predict", b'{"instances": [1.0, 2.0]}')
    assert status == 200


def test_hostile_requests_leave_the_process_no_larger(served):
  """RSS after a burst of hostile requests stays within 1.2x of before."""
  _normal_traffic(served)
  before = _rss(served)
  grpc_ok = (grpc.StatusCode.RESOURCE_EXHAUSTED,)
  port = served.rest_port
  burst = [
    (lambda: lib.grpc_code(served.predict.Predict, _string_bomb())[0], grpc_ok),
    (lambda: lib.grpc_code(served.predict.Predict, _rows(20000))[0], grpc_ok),
    (lambda: lib.grpc_code(served.predict.Classify, _context_bomb())[0], grpc_ok),
    (
      lambda: lib.post_json(port, f"/v1/models/{MODEL}:predict", json.dumps({"instances": [1.0] * 20000}).encode())[0],
      (413,),
    ),
    (lambda: _announce_huge_body(port, f"/v1/models/{MODEL}:predict")[0], (413,)),
    (lambda: lib.post_json(port, f"/v1/models/{MODEL}:predict", _nested_lists(10000))[0], (400,)),
  ]
  started = time.monotonic()
  wrong = []
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for _ in range(2):
      futures = [(pool.submit(send), want) for send, want in burst * 2]
      wrong += [(future.result(), want) for future, want in futures if future.result() not in want]
  elapsed = time.monotonic() - started
  _normal_traffic(served)  # Still serving.
  after = _rss(served)
  figures = (
    f"RSS before {before / 2**20:.0f} MiB, after "
    f"{after / 2**20:.0f} MiB ({after / before:.2f}x); burst took "
    f"{elapsed:.1f} s"
  )
  print(figures)
  assert not wrong, (figures, wrong)
  assert after <= 1.2 * before, figures


def _varint(n: int) -> bytes:
  out = b""
  while n >= 0x80:
    out += bytes([n & 0x7F | 0x80])
    n >>= 7
  return out + bytes([n])


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate], ids=["gzip", "deflate"])
def test_compressed_requests_inflate_only_up_to_the_message_limit(served, compression):
  """A request compressed on the wire is refused as it inflates past --grpc_max_receive_message_length.

  The native port's gRPC 1.51 inflated a message whole before checking the limit: a 250 KB gzip of
  256 MiB of zeros held that much, kept in the process for good (--retain_freed_memory).
  """
  channel = grpc.insecure_channel(
    f"127.0.0.1:{served.grpc_port}", options=[("grpc.max_send_message_length", -1)], compression=compression
  )
  raw_predict = channel.unary_unary(
    "/tensorflow.serving.PredictionService/Predict", request_serializer=bytes, response_deserializer=bytes
  )
  with channel:
    # Compressed and within the limit, a request is answered as ever (on the native fast path too).
    response = predict_pb2.PredictResponse.FromString(raw_predict(_rows(3).SerializeToString(), timeout=60))
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [2.5, 2.5, 2.5]
    _normal_traffic(served)
    before = _rss(served)
    size = 256 << 20  # An unknown field of zeros, which a parser would skip.
    bomb = _predict().SerializeToString() + b"\x7a" + _varint(size) + bytes(size)
    for _ in range(2):
      with pytest.raises(grpc.RpcError) as error:
        raw_predict(bomb, timeout=60)
      assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.details()
    del bomb
    after = _rss(served)
  _normal_traffic(served)  # Still serving.
  # What a request at the 64 MiB limit may leave (its buffers, kept as freed; the Python path's
  # grpcio inflates up to the limit, about 100 MiB), well under the 256 MiB the native port inflated.
  assert after - before < 3 * (64 << 20), f"RSS grew {(after - before) / 2**20:.0f} MiB"


# A refused request's size: large, and within the default 64 MiB message limit.
_LARGE_REQUEST_BYTES = 48 << 20


def test_refused_large_requests_are_freed_as_answered(served):
  """Bad requests sent one at a time reuse one request's memory.

  Each is refused (a string for a float input) and must be freed when its
  error is sent. A reference cycle through the error's traceback used to
  keep each one, and its copies, until Python's cyclic collector ran (about
  every tenth such request); freed memory stays in the process, so 20 of
  them grew the server by 0.6-1.4 GB, more the longer they came.

  The margin is one request's worth: 8 times its size, about what its copies
  take at once (gRPC's buffer, the native server's copy, the bytes handed to
  Python, the parsed messages). A fresh server grows that much on the first
  one, and up to about 5 sizes more as the allocator settles.
  """
  bad = _predict(x=tf.make_tensor_proto([b"s" * _LARGE_REQUEST_BYTES], dtype=tf.string))

  def refuse(count: int) -> None:
    for _ in range(count):
      code, details = lib.grpc_code(served.predict.Predict, bad)
      assert code == grpc.StatusCode.INVALID_ARGUMENT, details
      assert "Expects arg[0] to be float but string is provided" in details, details

  refuse(1)  # The first one's peak: what every later one may reuse.
  before = _rss(served)
  refuse(20)
  after = _rss(served)
  figures = f"RSS before {before / 2**20:.0f} MiB, after 20 refused requests {after / 2**20:.0f} MiB"
  print(figures)
  assert after - before <= 8 * _LARGE_REQUEST_BYTES, figures
  _normal_traffic(served)  # Still serving.


# --- The pieces ------------------------------------------------------------


def _signature(*shapes_and_dtypes):
  signature = meta_graph_pb2.SignatureDef()
  for i, (shape, dtype) in enumerate(shapes_and_dtypes):
    info = signature.inputs[f"in{i}"]
    info.name = f"in{i}:0"
    info.dtype = dtype
    info.tensor_shape.SetInParent()  # A scalar: a shape with no dims.
    if shape is None:
      info.tensor_shape.unknown_rank = True
    for size in shape or ():
      info.tensor_shape.dim.add(size=size)
  return signature


def test_limits_derive_from_the_signature():
  limits = request_limits.ExpansionLimits(rows=100)
  # [?, 8] float and [?] int64: 100 x (8 + 1) elements; bytes floored.
  elements, nbytes = limits.request_limits(_signature(([-1, 8], types_pb2.DT_FLOAT), ([-1], types_pb2.DT_INT64)))
  assert elements == 900 and nbytes == request_limits.MIN_DERIVED_BYTES
  # Unknown inner dims count 256 per row together; strings 1 KiB each.
  big = request_limits.ExpansionLimits(rows=1000)
  assert big.request_limits(_signature(([-1, -1, 4], types_pb2.DT_STRING))) == (1024000, 1024000 * 1024)
  # A static batch dimension and scalars are taken as they are.
  assert limits.request_limits(_signature(([3, 2], types_pb2.DT_FLOAT), ([], types_pb2.DT_FLOAT)))[0] == 7
  # Set limits win; negative ones are off.
  assert request_limits.ExpansionLimits(max_elements_per_request=5, max_bytes_per_request=-1).request_limits(
    _signature(([-1], types_pb2.DT_FLOAT))
  ) == (5, None)


def test_tensor_cost_reads_declarations_only():
  cost = request_limits.tensor_cost(_declared(types_pb2.DT_STRING, [1000, 50], string_val=[b"x" * 40]), "t")
  assert cost.elements == 50000 and cost.nbytes >= 49999 * 40
  assert request_limits.tensor_cost(_declared(types_pb2.DT_DOUBLE, [10], double_val=[1.0]), "t") == (10, 80)
  with pytest.raises(errors.ServingError) as e:
    request_limits.tensor_cost(_declared(types_pb2.DT_FLOAT, [4], tensor_content=b"\0" * 4), "t")
  assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_batches_are_bounded_by_elements():
  scheduler = batch_scheduler.SharedBatchScheduler(1)
  batches = []
  try:
    queue = scheduler.add_queue(
      batch_scheduler.QueueOptions(max_batch_size=100, batch_timeout_micros=200_000),
      lambda tasks: (batches.append([t.size for t in tasks]), batch_scheduler.finish_all(tasks, [None] * len(tasks))),
      max_elements=100,
      max_bytes=None,
    )
    tasks = [batch_scheduler.Task(1, None, elements=40) for _ in range(3)]
    for task in tasks:
      queue.schedule(task)
    for task in tasks:
      task.wait(10_000)
    assert batches == [[1, 1], [1]]  # 120 elements don't fit one batch.
    with pytest.raises(errors.ServingError) as e:
      queue.schedule(batch_scheduler.Task(1, None, elements=101))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max_elements_per_batch" in e.value.message
  finally:
    scheduler.stop()


def test_batch_budget_prices_feeds_by_their_signature():
  signature = _signature(([-1, 8], types_pb2.DT_FLOAT))
  budget = request_limits.ExpansionLimits().batch_budget({"serving_default": signature}, max_batch_size=32)
  assert budget(["in0:0"]) == (256, request_limits.MIN_DERIVED_BYTES)
  assert request_limits.ExpansionLimits(max_elements_per_batch=-1, max_bytes_per_batch=7).batch_budget(
    {"s": signature}, 32
  )(["in0:0"]) == (None, 7)
