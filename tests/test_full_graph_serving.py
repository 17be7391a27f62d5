"""The foundation end to end: an exported full graph (ScaNN inside) served by fgr-serve over gRPC.

Driven only through TF Serving's official stubs, as any TF Serving client would.
"""

import dataclasses
import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import wrappers_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from clients import query
from export import refresh_state, version_files, version_report, warmup
from models import config as config_lib
from models.data import queries as queries_lib
from models.data import schema, sources
from tests import topk_testlib
from tests.conftest import SCANN_EXPORT_K
from tests.serving import serving_testlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "retrieval"
K = SCANN_EXPORT_K


@pytest.fixture(scope="module")
def exported(trained_run, scann_export, tmp_path_factory):
  """(base path, its version's report, held-out queries): the shared ScaNN full-graph export as version 1."""
  base_path = str(tmp_path_factory.mktemp("models"))
  version_path = os.path.join(base_path, "1")
  version_files.link_tree(scann_export, version_path)
  report = dataclasses.replace(version_report.read(version_path), path=version_path)
  run_config = config_lib.read_run_config(trained_run)
  queries = queries_lib.held_out_queries(sources.open_source(sources.DataSpec.from_json(run_config["data"])), 16)
  return base_path, report, queries


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory, native_mode):
  """fgr-serve serving the export, once per --native mode."""
  base_path, report, queries = exported
  server = serving_testlib.ServerProcess(
    [f"--model_name={MODEL}", f"--model_base_path={base_path}"],
    str(tmp_path_factory.mktemp("server")),
    native=native_mode,
  )
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = MODEL
  serving_testlib.wait_for(
    lambda: any(v.state == v.AVAILABLE for v in server.model.GetModelStatus(request).model_version_status), timeout=120
  )
  yield server, report, queries
  assert server.terminate() == 0


def _request(queries, signature="serving_default", model=MODEL):
  return warmup.predict_request(queries, signature_name=signature, model_name=model)


def test_predict_returns_the_saved_model_top_k(served):
  import scann  # noqa: F401  Registers ScaNN's ops for the in-process reference.

  server, report, queries = served
  response = server.predict.Predict(_request(queries), timeout=30)
  assert response.model_spec.name == MODEL and response.model_spec.version.value == report.version
  assert response.model_spec.signature_name == "serving_default"
  ids, scores = tf.make_ndarray(response.outputs["ids"]), tf.make_ndarray(response.outputs["scores"])
  assert ids.shape == (16, K) and scores.shape == (16, K)
  loaded = tf.saved_model.load(report.path)
  tensors = {name: tf.constant(values) for name, values in queries.items()}
  expected = loaded.signatures["serving_default"](**tensors)
  # The server runs the same graph in another process (its own threads, maybe batched with other
  # requests): the same answers up to ties, which it may break otherwise.
  state = refresh_state.read_state(report.path)
  reference = topk_testlib.reference_scores(
    loaded.signatures["encode_query"](**tensors)["embedding"].numpy(), state.embeddings, state.eligible
  )
  topk_testlib.assert_top_k_agree(
    topk_testlib.rows_of(ids, state.ids), topk_testlib.rows_of(expected["ids"].numpy(), state.ids), reference
  )
  np.testing.assert_allclose(scores, expected["scores"].numpy(), rtol=1e-5)


def test_output_filter_and_encode_query(served):
  server, _, queries = served
  request = _request(queries, signature="encode_query")
  request.output_filter.append("embedding")
  response = server.predict.Predict(request, timeout=30)
  embedding = tf.make_ndarray(response.outputs["embedding"])
  np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-4)


def test_metadata_lists_the_three_signatures(served):
  server, report, _ = served
  request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
  request.model_spec.name = MODEL
  response = server.predict.GetModelMetadata(request, timeout=30)
  signatures = get_model_metadata_pb2.SignatureDefMap()
  response.metadata["signature_def"].Unpack(signatures)
  assert {"serving_default", "encode_query", "encode_item"} <= set(signatures.signature_def)
  assert set(signatures.signature_def["serving_default"].inputs) == set(schema.QUERY_FEATURE_NAMES)
  assert set(signatures.signature_def["serving_default"].outputs) == {"ids", "scores"}


def test_bad_requests_get_tf_serving_codes_and_the_server_survives(served):
  server, report, queries = served
  cases = [(_request(queries, model="no_such_model"), grpc.StatusCode.NOT_FOUND)]
  missing = _request(queries)
  del missing.inputs["hist_ids"]
  cases.append((missing, grpc.StatusCode.INVALID_ARGUMENT))
  wrong_dtype = _request(queries)
  wrong_dtype.inputs["user_id"].CopyFrom(tf.make_tensor_proto(np.array([1.0] * 16, np.float32)))
  cases.append((wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT))
  extra = _request(queries)
  extra.inputs["surprise"].CopyFrom(tf.make_tensor_proto(np.array([b"x"] * 16)))
  cases.append((extra, grpc.StatusCode.INVALID_ARGUMENT))
  cases.append((_request(queries, signature="no_such_signature"), grpc.StatusCode.FAILED_PRECONDITION))
  unknown_version = _request(queries)
  unknown_version.model_spec.version.CopyFrom(wrappers_pb2.Int64Value(value=report.version + 100))
  cases.append((unknown_version, grpc.StatusCode.NOT_FOUND))
  bad_filter = _request(queries)
  bad_filter.output_filter.append("no_such_output")
  cases.append((bad_filter, grpc.StatusCode.INVALID_ARGUMENT))
  for request, code in cases:
    with pytest.raises(grpc.RpcError) as error:
      server.predict.Predict(request, timeout=30)
    assert error.value.code() == code, error.value.details()
    assert error.value.details()
  assert server.process.poll() is None
  assert server.predict.Predict(_request(queries), timeout=30).outputs["ids"].tensor_shape.dim[1].size == K


def test_empty_predict_request_is_invalid(served):
  server, _, _ = served
  request = predict_pb2.PredictRequest()
  request.model_spec.name = MODEL
  with pytest.raises(grpc.RpcError) as error:
    server.predict.Predict(request, timeout=30)
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_query_client_sends_left_out_features_empty_and_prints_any_signature(served):
  """fgr-query's client half (clients/query.py): a request with only a query, any signature's outputs."""
  server, _, _ = served
  spec = query.model_spec(MODEL, "serving_default")
  inputs = query.signature_inputs(server.predict, spec, timeout=30)
  assert set(inputs) == set(schema.QUERY_FEATURE_NAMES)
  features = query.complete_features({"query_tokens": ["t3_1", "t3_7"]}, inputs)
  assert features["user_id"] == "" and features["hist_ids"] == [""]  # [B] and [B, L] string inputs.
  row = query.answer_row(server.predict.Predict(query.predict_request(features, spec), timeout=30), top=5)
  assert set(row) == {"ids", "scores"} and len(row["ids"]) == 5 and row["scores"] == sorted(row["scores"])[::-1]
  assert "    1  " in query.format_row(0, 1, row)

  encode = query.model_spec(MODEL, "encode_query")
  features = query.complete_features({}, query.signature_inputs(server.predict, encode, timeout=30))
  row = query.answer_row(server.predict.Predict(query.predict_request(features, encode), timeout=30), top=4)
  assert list(row) == ["embedding"] and len(row["embedding"]) == 4
  assert "embedding: [" in query.format_row(0, 1, row)

  with pytest.raises(query.QueryError, match="has no signature 'nope'; it has: .*encode_query") as refused:
    query.signature_inputs(server.predict, query.model_spec(MODEL, "nope"), timeout=30)
  assert "__saved_model_init_op" not in str(refused.value)  # The SavedModel's own entry is no signature to call.
  with pytest.raises(query.QueryError, match="GetModelMetadata failed: NOT_FOUND"):
    query.signature_inputs(server.predict, query.model_spec("no_such_model", "serving_default"), timeout=30)


def test_query_client_waits_for_a_server_a_bounded_time():
  with serving_testlib.refusing_port() as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    with pytest.raises(query.QueryError, match=f"No server answered at 127.0.0.1:{port} within 0.3 s"):
      query.wait_for_server(channel, f"127.0.0.1:{port}", 0.3)


def test_fgr_query_sends_every_line_of_a_requests_file(served, tmp_path):
  server, _, _ = served
  lines = [{"query_tokens": ["t3_1"], "hist_ids": ["ad3", "ad53"], "hist_categories": ["c3", "c3"]}, {"user_id": "u1"}]
  requests_file = tmp_path / "requests.jsonl"
  requests_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
  env = {**os.environ, "PYTHONPATH": REPO_ROOT}
  script = "import sys; from cli import launch; sys.argv[0] = 'fgr-query'; launch.fgr_query()"
  result = subprocess.run(
    [sys.executable, "-c", script, f"--server=127.0.0.1:{server.grpc_port}", f"--model_name={MODEL}",
     f"--requests_file={requests_file}", "--json", "--top=3", "--wait_for_server=60"],
    capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  *answers, latency = [json.loads(line) for line in result.stdout.splitlines()]
  assert [a["request"] for a in answers] == [0, 1] and all(len(a["ids"]) == 3 for a in answers)
  assert latency["requests"] == 2  # Two requests sent: their latency percentiles close the output.
