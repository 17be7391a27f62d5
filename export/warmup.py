"""Warm-up requests in TF Serving's format: assets.extra/tf_serving_warmup_requests.

TF Serving (and fgr-serve) replays these PredictionLog records when it loads a version, before the
version takes traffic, so the first real request does not pay for graph tracing and lazy allocation.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from engine import base
from export import version_files

WARMUP_FILE = "tf_serving_warmup_requests"
MAX_RECORDS = 1000  # TF Serving's limit.


def predict_request(
  features: dict[str, np.ndarray], signature_name: str = "serving_default", model_name: str = ""
) -> predict_pb2.PredictRequest:
  """A PredictRequest carrying one batch of raw string features."""
  request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name))
  for name, values in features.items():
    request.inputs[name].CopyFrom(tf.make_tensor_proto(base.string_array(values)))
  return request


def sample_requests(samples: dict[str, np.ndarray], count: int) -> list[predict_pb2.PredictRequest]:
  """Batch-1 PredictRequests of the first `count` rows of held-out query features."""
  num_rows = len(next(iter(samples.values())))
  return [
    predict_request({name: values[i : i + 1] for name, values in samples.items()}) for i in range(min(count, num_rows))
  ]


def write_warmup(saved_model_dir: str, requests: list[predict_pb2.PredictRequest]) -> str:
  """Writes the requests as PredictionLogs into saved_model_dir/assets.extra; returns the file path."""
  if len(requests) > MAX_RECORDS:
    raise ValueError(f"TF Serving replays at most {MAX_RECORDS} warm-up records, got {len(requests)}")
  directory = os.path.join(saved_model_dir, version_files.EXTRA_DIR)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, WARMUP_FILE)
  with tf.io.TFRecordWriter(path) as writer:
    for request in requests:
      log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
      writer.write(log.SerializeToString())
  return path


def read_warmup_queries(version_path: str) -> list[dict[str, np.ndarray]]:
  """The query features of a version's warm-up Predict requests (one dict per request)."""
  path = version_files.extra_path(version_path, WARMUP_FILE)
  if not os.path.exists(path):
    return []
  queries = []
  for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
    request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
    queries.append({name: tf.make_ndarray(proto) for name, proto in request.inputs.items()})
  return queries
