"""fgr-query and fgr-loadtest as their users run them: one-line errors for mistakes, flags checked, TLS."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags
from absl.testing import flagsaver
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from clients import grpc_channel, query
from clients.loadtest import driver, loadtest_cli, request_source
from tests.serving import serving_testlib as lib

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
  query_result, loadtest_result = run_tools(
    ["fgr-query", "--server=127.0.0.1:1", f"--requests_file={tmp_path / 'missing.jsonl'}"],
    ["fgr-loadtest", "--server=127.0.0.1:1", f"--requests_file={ragged}", "--noprogress"],
  )
  for result, line in (
    (query_result, f"fgr-query: error: cannot read {tmp_path / 'missing.jsonl'}: No such file or directory"),
    (loadtest_result, f"fgr-loadtest: error: {ragged}:1: feature 'text': nested lists must all have the same length"),
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


def test_answer_rows_read_outputs_sent_as_tensor_content():
  """What TF Serving answers with --enable_serialization_as_tensor_content: every output in
  tensor_content, strings as their varint lengths then their bytes (tf.make_ndarray refused those)."""
  response = predict_pb2.PredictResponse()
  ids = response.outputs["ids"]
  ids.dtype = tf.string.as_datatype_enum
  ids.tensor_shape.dim.add(size=1)
  ids.tensor_shape.dim.add(size=3)
  ids.tensor_content = b"\x01\x02\x00abc"
  scores = response.outputs["scores"]
  scores.dtype = tf.float32.as_datatype_enum
  scores.tensor_shape.dim.add(size=1)
  scores.tensor_content = np.array([0.5], np.float32).tobytes()
  assert query.answer_row(response, top=None) == {"ids": ["a", "bc", ""], "scores": [0.5]}


def test_fgr_query_refuses_a_negative_top_or_no_timeout():
  top, timeout = run_tools(["fgr-query", "--top=-1"], ["fgr-query", "--timeout=0"])
  assert top.returncode == 1 and "flag --top=-1: -1 is not a non-negative integer" in top.stderr, top.stderr
  assert timeout.returncode == 1 and "--timeout must be more than 0 seconds" in timeout.stderr, timeout.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, tuple[str, str]]:
  """(key path, certificate path) of the server, whose certificate names only fgr.test (so reaching it at
  127.0.0.1 takes --tls_server_name), and of a client, for mutual TLS."""
  directory = str(tmp_path_factory.mktemp("certs"))
  return {
    "server": lib.self_signed_cert(directory, ["fgr.test"]),
    "client": lib.self_signed_cert(directory, ["client"]),
  }


def _tls_server(directory: pathlib.Path, certs: dict[str, tuple[str, str]], client_verify: bool) -> lib.InProcessServer:
  """fgr-serve of half_plus_two (with its `echo` signature) as model `m`, over TLS only; with `client_verify`,
  to clients presenting the client certificate."""
  key, cert = (pathlib.Path(path).read_text() for path in certs["server"])
  config = f"server_key: {json.dumps(key)}\nserver_cert: {json.dumps(cert)}\n"
  if client_verify:
    config += f"custom_ca: {json.dumps(pathlib.Path(certs['client'][1]).read_text())}\nclient_verify: true\n"
  (directory / "ssl.config").write_text(config)
  lib.write_tf2_half_plus_two(str(directory / "m" / "1"))
  return lib.InProcessServer(
    model_name="m", model_base_path=str(directory / "m"), ssl_config_file=str(directory / "ssl.config")
  )


def test_fgr_query_over_tls_sends_utf8_features(certs, tmp_path):
  server = _tls_server(tmp_path, certs, client_verify=False)
  requests_file = tmp_path / "requests.jsonl"
  requests_file.write_text(json.dumps({"text": "héllo 口红"}) + "\n")
  args = [f"--server=127.0.0.1:{server.server.grpc_port}", "--model_name=m", "--signature_name=echo"]
  args += [f"--requests_file={requests_file}", "--json", f"--tls_root_certs={certs['server'][1]}"]
  try:
    (answered,) = run_tools(["fgr-query", *args, "--tls_server_name=fgr.test"])
    # The certificate is checked: 127.0.0.1 is not on it.
    tls = grpc_channel.Tls(root_certs=pathlib.Path(certs["server"][1]).read_bytes())
    with grpc_channel.channel(f"127.0.0.1:{server.server.grpc_port}", tls) as channel:
      stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
      with pytest.raises(query.QueryError, match="GetModelMetadata failed: UNAVAILABLE"):
        query.signature_inputs(stub, query.model_spec("m", "echo"), timeout=60)
  finally:
    server.stop()
  assert answered.returncode == 0, answered.stderr[-3000:]
  answer = json.loads(answered.stdout.splitlines()[0])
  assert answer["text_out"] == ["héllo 口红"] and answer["length"] == [len("héllo 口红".encode())]


def test_fgr_loadtest_over_mutual_tls(certs, tmp_path):
  server = _tls_server(tmp_path, certs, client_verify=True)
  address = f"127.0.0.1:{server.server.grpc_port}"
  requests_file = tmp_path / "requests.jsonl"
  requests_file.write_text(json.dumps({"text": "口红"}) + "\n")
  (client_key, client_cert), (_, server_cert) = certs["client"], certs["server"]
  absl_flags.FLAGS(["fgr-loadtest"])
  try:
    with flagsaver.flagsaver(
      server=address,
      model_name="m",
      signature_name="echo",
      requests_file=str(requests_file),
      mode="closed",
      concurrency=1,
      warmup_seconds=0,
      duration_seconds=600,  # Only an upper bound: the run ends at --max_requests.
      max_requests=4,
      output_prefix=str(tmp_path / "run"),
      progress=False,
      tls_root_certs=server_cert,
      tls_client_cert=client_cert,
      tls_client_key=client_key,
      tls_server_name="fgr.test",
    ):
      loadtest_cli.main(["fgr-loadtest"])
    # Without the client certificate the server refuses the connection.
    spec = driver.LoadSpec(
      mode="closed", concurrency=1, warmup_seconds=0, duration_seconds=600, max_requests=2, progress=False
    )
    tls = grpc_channel.Tls(root_certs=pathlib.Path(server_cert).read_bytes(), server_name="fgr.test")
    requests = request_source.with_model_spec(request_source.read_requests_file(str(requests_file)), "m", "echo", None)
    refused = driver.run(driver.GrpcPredictTarget(address, tls=tls), requests, spec)
  finally:
    server.stop()
  with open(tmp_path / "run.json") as f:
    report = json.load(f)
  assert report["requests"]["ok"] == 4 and report["errors"] == {}, report
  assert refused.successes == 0 and refused.errors == {"UNAVAILABLE": 2}, refused.errors


def test_tls_flags_are_checked(tmp_path):
  absl_flags.FLAGS(["fgr-loadtest"])
  assert grpc_channel.tls_from_flags() is None  # Plaintext unless a --tls* flag is given.
  with flagsaver.flagsaver(tls=True):
    assert grpc_channel.tls_from_flags() == grpc_channel.Tls()  # gRPC's default roots.
  not_pem = tmp_path / "cert.der"
  not_pem.write_bytes(b"\x30\x82\x01\x0a")
  for given, message in (
    ({"tls_root_certs": str(tmp_path / "missing.pem")}, f"--tls_root_certs: cannot read {tmp_path}/missing.pem: "),
    ({"tls_root_certs": str(not_pem)}, f"--tls_root_certs: {not_pem} is not a PEM file"),
  ):
    with flagsaver.flagsaver(**given), pytest.raises(ValueError, match=re.escape(message)):
      grpc_channel.tls_from_flags()
  with flagsaver.flagsaver(), pytest.raises(absl_flags.IllegalFlagValueError, match="go together"):
    absl_flags.FLAGS(["fgr-loadtest", "--tls_client_cert=client.pem"])
  with pytest.raises(ValueError, match="give both or neither"):
    grpc_channel.Tls(client_key=b"-----BEGIN PRIVATE KEY-----")


def test_clients_import_nothing_from_the_server():
  """clients/ stands apart from serving/ (clients/__init__.py): a client install needs no server code."""
  imported = set()
  for path in pathlib.Path(REPO_ROOT, "clients").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported.update((path.name, alias.name) for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module:
        imported.add((path.name, node.module))
  assert not {(name, module) for name, module in imported if module.split(".")[0] == "serving"}


def test_requests_take_each_input_s_dtype_and_shape_from_the_signature():
  """fgr-query sent every value as a string tensor of [1] or [1, n]: search_with_options' knobs (an int32
  [C], a float scalar, a string scalar) could not be sent at all."""
  from tensorflow.core.protobuf import meta_graph_pb2

  def info(dtype, dims):
    tensor = meta_graph_pb2.TensorInfo(dtype=dtype.as_datatype_enum)
    for size in dims:
      tensor.tensor_shape.dim.add(size=size)
    return tensor

  inputs = {
    "query": info(tf.string, [-1]),
    "history": info(tf.string, [-1, -1]),
    "channel_depths": info(tf.int32, [2]),
    "min_relevance": info(tf.float32, []),
    "diversity": info(tf.string, []),
  }
  features = {"query": "shoes", "history": ["a", "b"], "channel_depths": [20, 10], "min_relevance": 0.5}
  request = query.predict_request(
    {**features, "diversity": "ssd"}, query.model_spec("m", "search_with_options"), inputs
  )
  decoded = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
  assert decoded["query"].tolist() == [b"shoes"] and decoded["history"].tolist() == [[b"a", b"b"]]
  assert decoded["channel_depths"].dtype == np.int32 and decoded["channel_depths"].tolist() == [20, 10]
  assert decoded["min_relevance"].dtype == np.float32 and decoded["min_relevance"].shape == ()
  assert decoded["diversity"].shape == () and decoded["diversity"] == b"ssd"
  with pytest.raises(ValueError, match=r"feature 'channel_depths': not a value of dtype int32"):
    query.predict_request({"channel_depths": ["many", 1]}, query.model_spec("m", ""), inputs)
  # A requests file's bad value names the file and the request (it named the feature only).
  with pytest.raises(ValueError, match=r"^r\.jsonl: request 2: feature 'channel_depths': not a value of dtype int32"):
    query.typed_requests([{}, {"channel_depths": ["many", 1]}], query.model_spec("m", ""), inputs, "r.jsonl")
