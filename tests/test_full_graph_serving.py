"""The foundation end to end: an exported full graph (ScaNN inside) served by fgr-serve over gRPC.

Driven only through TF Serving's official stubs, as any TF Serving client would.
"""

import dataclasses
import os

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import wrappers_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from export import refresh_state, version_files, version_report, warmup
from models import config as config_lib
from models.data import queries as queries_lib
from models.data import schema, sources
from tests import topk_testlib
from tests.conftest import SCANN_EXPORT_K
from tests.serving import serving_testlib

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
