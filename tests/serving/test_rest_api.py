"""REST API and Prometheus tests, modelled on TF Serving's REST test cases."""

import base64
import gzip
import http.client
import json
import socket
import urllib.error
import urllib.request

import grpc
import pytest
from serving_testlib import TF1_MODEL, TF1_VERSION, TF2_MODEL
from tensorflow_serving.apis import predict_pb2

from serving.model_servers import http_server


def _call(server, path, body=None, method=None):
  url = f"http://127.0.0.1:{server.rest_port}{path}"
  data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
  request = urllib.request.Request(url, data=data, method=method)
  try:
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.status, response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def _json(server, path, body=None):
  status, data = _call(server, path, body)
  return status, json.loads(data)


def test_model_status(server):
  status, body = _json(server, f"/v1/models/{TF1_MODEL}")
  assert status == 200
  assert body == {
    "model_version_status": [
      {"version": str(TF1_VERSION), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]
  }
  status, body = _json(server, f"/v1/models/{TF2_MODEL}/labels/stable")
  assert [s["version"] for s in body["model_version_status"]] == ["1"]


def test_metadata(server):
  status, body = _json(server, f"/v1/models/{TF1_MODEL}/metadata")
  assert status == 200
  assert body["model_spec"]["name"] == TF1_MODEL
  assert body["model_spec"]["version"] == str(TF1_VERSION)
  signature = body["metadata"]["signature_def"]["signature_def"]
  assert signature["serving_default"]["method_name"] == ("tensorflow/serving/predict")
  assert signature["serving_default"]["inputs"]["x"]["dtype"] == "DT_FLOAT"


def test_predict_row_and_columnar(server):
  status, body = _json(server, f"/v1/models/{TF1_MODEL}:predict", {"instances": [[1.0], [2.0], [5.0]]})
  assert (status, body) == (200, {"predictions": [[2.5], [3.0], [4.5]]})
  status, body = _json(
    server,
    f"/v1/models/{TF1_MODEL}/versions/{TF1_VERSION}:predict",
    {"signature_name": "predict_two_outputs", "inputs": {"x": [[1.0]]}},
  )
  assert body == {"outputs": {"y": [[2.5]], "x_out": [[1.0]]}}
  status, body = _json(server, f"/v1/models/{TF2_MODEL}/labels/stable:predict", {"inputs": [1.0, 2.1]})
  assert body == {"outputs": pytest.approx([2.5, 3.05])}


def test_predict_strings_and_b64(server):
  blob = b"\x00\xffbin"
  status, body = _json(
    server,
    f"/v1/models/{TF2_MODEL}:predict",
    {"signature_name": "echo", "instances": ["héllo", {"b64": base64.b64encode(blob).decode()}]},
  )
  assert status == 200, body
  first, second = body["predictions"]
  assert first == {"text_out": "héllo", "length": 6, "blob_bytes": {"b64": base64.b64encode("héllo".encode()).decode()}}
  assert second["blob_bytes"] == {"b64": base64.b64encode(blob).decode()}
  assert second["length"] == len(blob)


def test_bodies_tf_serving_takes(server):
  """What TF Serving's parsers accept: a byte order mark before the body (RapidJSON skips it) and
  base64 broken into lines, with spaces or with "." as padding (absl::Base64Unescape)."""
  status, body = _json(server, f"/v1/models/{TF1_MODEL}:predict", b"\xef\xbb\xbf" + b'{"instances": [[1.0]]}')
  assert (status, body) == (200, {"predictions": [[2.5]]})
  for encoded in ["aGVs\nbG8=\n", " aGVsbG8= ", "aGVsbG8.", "aGVsbG8"]:
    status, body = _json(
      server, f"/v1/models/{TF2_MODEL}:predict", {"signature_name": "echo", "instances": [{"b64": encoded}]}
    )
    assert status == 200, (encoded, body)
    assert body["predictions"][0]["blob_bytes"] == {"b64": base64.b64encode(b"hello").decode()}, encoded


def _post_gzip(server, path, body: bytes, encoding="gzip"):
  request = urllib.request.Request(
    f"http://127.0.0.1:{server.rest_port}{path}", data=body, method="POST", headers={"Content-Encoding": encoding}
  )
  try:
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_gzip_request_bodies(server):
  """TF Serving's HTTP server inflates a `Content-Encoding: gzip` body (auto_uncompress_input, on by
  default); here it was read as JSON, a 400. Inflating stops at the body limit, so a small body of
  zeros is a 413, not gigabytes held."""
  path = f"/v1/models/{TF1_MODEL}:predict"
  body = b'{"instances": [[1.0], [2.0]]}'
  assert _post_gzip(server, path, gzip.compress(body)) == (200, {"predictions": [[2.5], [3.0]]})
  assert _post_gzip(server, path, gzip.compress(body), "x-custom, gzip") == (200, {"predictions": [[2.5], [3.0]]})
  assert _post_gzip(server, path, body, "identity") == (200, {"predictions": [[2.5], [3.0]]})
  for broken in [body, gzip.compress(body)[:-12]]:  # Not gzip; cut short.
    status, answer = _post_gzip(server, path, broken)
    assert status == 400 and answer["error"].startswith("Unable to decompress the gzip request body"), answer
  status, answer = _post_gzip(server, path, gzip.compress(bytes(65 << 20)))  # The default limit is 64 MiB.
  assert status == 413 and "once decompressed" in answer["error"], answer
  assert _post_gzip(server, path, gzip.compress(body)) == (200, {"predictions": [[2.5], [3.0]]})
  request = urllib.request.Request(
    f"http://127.0.0.1:{server.rest_port}/v1/models/{TF1_MODEL}", data=b"junk", method="GET",
    headers={"Content-Encoding": "gzip"},
  )  # fmt: skip
  with urllib.request.urlopen(request, timeout=30) as response:  # A GET's body is ignored.
    assert response.status == 200


def test_a_number_beyond_a_double_is_a_parse_error(server):
  """1e400 is no double: TF Serving's parser refuses it. json's would make it inf and feed it."""
  status, body = _json(server, f"/v1/models/{TF1_MODEL}:predict", b'{"instances": [[1e400]]}')
  assert status == 400 and body["error"].startswith("JSON Parse error: Number too big to be stored in double: 1e400")
  status, body = _json(server, f"/v1/models/{TF1_MODEL}:predict", b'{"instances": [[1.5e-400], [2e+100]]}')
  assert status == 400 and "Unable to convert input x to float32" in body["error"], body  # 2e100 is no float32.
  status, body = _json(server, f"/v1/models/{TF1_MODEL}:predict", b'{"instances": [[1.5e-400]]}')
  assert (status, body) == (200, {"predictions": [[2.0]]})


def test_classify_and_regress(server):
  status, body = _json(
    server, f"/v1/models/{TF1_MODEL}:classify", {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}
  )
  assert (status, body) == (200, {"results": [[["", 3.0]]]})
  status, body = _json(
    server,
    f"/v1/models/{TF1_MODEL}:regress",
    {"signature_name": "regress_x2_to_y3", "context": {"x2": 4.0}, "examples": [{"x": 1.0}, {"x": 1.0}]},
  )
  assert (status, body) == (200, {"results": [5.0, 5.0]})


@pytest.mark.parametrize(
  "method, path, body, code, message",
  [
    (
      "POST",
      "/v1/models/missing:predict",
      {"instances": [[1.0]]},
      404,
      "Servable not found for request: Latest(missing)",
    ),
    ("GET", f"/v1/models/{TF1_MODEL}/versions/9", None, 404, f"Could not find version 9 of model {TF1_MODEL}"),
    ("POST", f"/v1/models/{TF1_MODEL}:predict", b"{not json", 400, "JSON Parse error"),
    (
      "POST",
      f"/v1/models/{TF1_MODEL}:predict",
      {"signature_name": "nope", "instances": [[1.0]]},
      400,
      'Serving signature name: "nope" not found',
    ),
    ("POST", f"/v1/models/{TF1_MODEL}:predict", {"instances": [["a"]]}, 400, "Unable to convert JSON value 'a'"),
    (  # As over gRPC, an input's error names the servable.
      "POST",
      f"/v1/models/{TF1_MODEL}:predict",
      {"instances": [{"x": [1.0], "y": [2.0]}]},
      400,
      f"y key not found in signature inputs {{x}} [model: {TF1_MODEL}, version: {TF1_VERSION}, signature: serving_default]",
    ),
    ("POST", f"/v1/models/{TF1_MODEL}:predict", {"instances": [[1.0], [1.0, 2.0]]}, 400, "not a rectangular tensor"),
    # Deeper than NumPy's 64 dimensions: a 400, not NumPy's ValueError as a 500.
    (
      "POST",
      f"/v1/models/{TF1_MODEL}:predict",
      {"instances": [json.loads("[" * 70 + "1" + "]" * 70)]},
      400,
      "deeper than 64 levels",
    ),
    ("POST", f"/v1/models/{TF1_MODEL}:predict", {"instances": [[1.0, 2.0]]}, 400, "has shape [1, 2]"),
    ("POST", f"/v1/models/{TF1_MODEL}:predict", {"foo": 1}, 400, "Missing 'inputs' or 'instances' key"),
    ("POST", f"/v1/models/{TF1_MODEL}:predict", {"inputs": {"z": [1.0]}}, 400, "Missing named input: x in 'inputs'"),
    ("POST", f"/v1/models/{TF1_MODEL}:explode", {}, 400, "Malformed request: POST"),
    (
      "POST",
      f"/v1/models/{TF1_MODEL}:classify",
      {"examples": [{"x": 1.0}]},
      400,
      "No classification inputs found in SignatureDef",
    ),
    (
      "POST",
      f"/v1/models/{TF1_MODEL}:regress",
      {"signature_name": "regress_x_to_y", "examples": [{"x": 2**70}]},
      400,
      "Feature x: 1180591620717411303424 is out of the int64 range",
    ),
    (
      "POST",
      f"/v1/models/{TF1_MODEL}:classify",
      {"signature_name": "classify_x_to_y", "context": {"c": -(2**63) - 1}, "examples": [{"x": 1.0}]},
      400,
      "is out of the int64 range",
    ),
    # TF Serving's JSON parser refuses an unpaired surrogate; Python's keeps it, and encoding it failed (500).
    ("POST", f"/v1/models/{TF1_MODEL}:predict", b'{"instances": ["\\ud800"]}', 400, "unpaired UTF-16 surrogate"),
    (
      "POST",
      f"/v1/models/{TF1_MODEL}:regress",
      {"signature_name": "regress_x_to_y", "examples": [{"x": [2.5, 1]}]},
      400,
      "Unexpected element type in feature: x",
    ),
    # A TF error echoing the request's bytes is not UTF-8: still the op's INVALID_ARGUMENT, not a 500.
    (
      "POST",
      f"/v1/models/{TF1_MODEL}:predict",
      {"signature_name": "regress_x_to_y", "instances": [{"b64": base64.b64encode(b"\xff\xfe junk").decode()}]},
      400,
      "Could not parse example input, value: '\\xff\\xfe junk'",
    ),
    # Every method reaches the API, which serves GET and POST (http.server's default: an HTML 501).
    ("PUT", f"/v1/models/{TF1_MODEL}:predict", {"instances": [[1.0]]}, 400, "Malformed request: PUT"),
    ("DELETE", f"/v1/models/{TF1_MODEL}", None, 400, "Malformed request: DELETE"),
    ("PATCH", f"/v1/models/{TF1_MODEL}", {}, 400, "Malformed request: PATCH"),
    ("GET", "/v1/models", None, 400, "Missing model name in request."),
    ("GET", f"/v1/models/{TF2_MODEL}/labels/nope", None, 400, "Unrecognized servable version label: nope"),
    ("GET", "/nothing/here", None, 404, "Not found"),
  ],
)
def test_errors(server, method, path, body, code, message):
  status, data = _call(server, path, body, method)
  assert status == code
  assert message in json.loads(data)["error"]


def test_requests_tf_serving_accepts(server):
  """Requests TF Serving's JSON handling accepts, that fgr-serve refused."""
  # Base64 without its "=" padding (absl::Base64Unescape makes it optional).
  status, body = _json(
    server, f"/v1/models/{TF2_MODEL}:predict", {"signature_name": "echo", "instances": [{"b64": "YQ"}]}
  )
  assert (status, body["predictions"][0]["text_out"]) == (200, "a")
  # Keys of the columnar "inputs" object that are not the signature's inputs are ignored.
  status, body = _json(server, f"/v1/models/{TF1_MODEL}:predict", {"inputs": {"x": [[1.0]], "request_id": "r-1"}})
  assert (status, body) == (200, {"outputs": [[2.5]]})


def test_head_and_cors_preflight(server):
  status, data = _call(server, f"/v1/models/{TF1_MODEL}", method="HEAD")
  assert (status, data) == (400, b"")  # The API serves GET and POST; a HEAD reply carries no body.
  # A preflight is OK only with an http(s) Origin, as in TF Serving.
  url = f"http://127.0.0.1:{server.rest_port}/v1/models/{TF1_MODEL}:predict"
  for headers, expected in (({"Origin": "https://app.example"}, 200), ({}, 400)):
    request = urllib.request.Request(url, method="OPTIONS", headers=headers)
    try:
      with urllib.request.urlopen(request, timeout=30) as response:
        status = response.status
    except urllib.error.HTTPError as e:
      status = e.code
    assert status == expected, headers


def test_chunked_request_bodies(server):
  """Bodies sent with Transfer-Encoding: chunked (no Content-Length) are read whole, and the
  connection stays usable; malformed chunks are a 400."""
  connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
  try:
    for _ in range(2):  # The second request on the same connection finds it in order.
      parts = iter([b'{"instances": ', b"[[1.0], [3.0]]", b"}"])
      connection.request("POST", f"/v1/models/{TF1_MODEL}:predict", body=parts, encode_chunked=True)
      response = connection.getresponse()
      assert (response.status, json.loads(response.read())) == (200, {"predictions": [[2.5], [3.5]]})
  finally:
    connection.close()
  with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as raw:
    raw.sendall(
      f"POST /v1/models/{TF1_MODEL}:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
      + b"zz\r\n{}\r\n0\r\n\r\n"
    )
    reply = b""
    while chunk := raw.recv(65536):  # The server closes the connection after the error.
      reply += chunk
  status_line, _, rest = reply.decode().partition("\r\n")
  assert status_line.split()[1] == "400" and "bad chunk size" in rest


def test_rest_listens_with_a_full_backlog():
  """socketserver's backlog of 5 reset connections under bursts of new clients."""
  assert http_server._PooledHTTPServer.request_queue_size >= 128


def test_prometheus_metrics(server):
  """Counts this test's own requests: it must pass alone, in any order."""
  _json(server, f"/v1/models/{TF1_MODEL}:predict", {"instances": [[1.0]]})
  missing = predict_pb2.PredictRequest()
  missing.model_spec.name = "missing"
  with pytest.raises(grpc.RpcError):
    server.predict.Predict(missing, timeout=60)
  status, data = _call(server, "/monitoring/prometheus/metrics")
  assert status == 200
  text = data.decode()
  assert (f':tensorflow:serving:request_count_total{{model_name="{TF1_MODEL}",status="OK"}}') in text
  assert ':tensorflow:serving:request_latency_bucket{API="predict"' in text
  assert (':tensorflow:serving:request_count_total{model_name="",status="NOT_FOUND"}') in text


def test_unknown_model_names_add_no_metric_series(server):
  """Every name a client makes up counts under one label: the series, and the server, do not grow."""

  def series() -> int:
    return _call(server, "/monitoring/prometheus/metrics")[1].decode().count("\n:tensorflow:serving:")

  def ask(name: str) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    with pytest.raises(grpc.RpcError):
      server.predict.Predict(request, timeout=60)
    assert _call(server, f"/v1/models/{name}:predict", {"instances": [[1.0]]})[0] == 404

  ask("made-up-0")  # May add the series of unknown models, once.
  before = series()
  for i in range(1, 50):
    ask(f"made-up-{i}")
  text = _call(server, "/monitoring/prometheus/metrics")[1].decode()
  assert series() == before and "made-up" not in text
