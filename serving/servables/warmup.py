"""Replays assets.extra/tf_serving_warmup_requests before a version serves."""

import os
import threading
import time

import grpc
import tensorflow as tf
from absl import logging
from tensorflow_serving.apis import prediction_log_pb2

from serving import errors
from serving.servables import classifier, multi_inference, predict_util, regressor, saved_model_bundle

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000


def run_warmup(
  bundle: saved_model_bundle.SavedModelBundle, iterations: int = 1, stop: threading.Event | None = None
) -> int:
  """Replays the servable's warm-up log, if it has one.

  Args:
    bundle: The freshly loaded servable.
    iterations: How many times each record is replayed (TF Serving's
      --num_request_iterations_for_warmup; values < 1 mean once).
    stop: Set when the server stops: the replay ends before the next record.
      Each batched record may wait out the batch timeout, so without it a
      shutdown during warm-up waits for up to 1000 of them.

  Returns:
    The number of records replayed.

  Raises:
    ServingError: if the file is malformed, has more than 1000 records or a
      request fails; the version then fails to load, as in TF Serving.
      CANCELLED when `stop` is set before the replay ends.
  """
  path = os.path.join(bundle.path, WARMUP_FILE)
  if not os.path.isfile(path):
    return 0
  logging.info("Starting to read warmup data for model at %s", path)
  start = time.monotonic()
  try:
    records = []
    for record in tf.data.TFRecordDataset(path):
      records.append(record.numpy())
      if len(records) > MAX_WARMUP_RECORDS:
        raise errors.invalid_argument(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}")
  except tf.errors.OpError as e:
    raise errors.invalid_argument(f"Failed to read warmup records from {path}: {e.message}") from e
  for _ in range(max(1, iterations)):
    for raw in records:
      if stop is not None and stop.is_set():
        raise errors.ServingError(
          grpc.StatusCode.CANCELLED, f"Warm-up of {bundle.path} stopped: the server is stopping"
        )
      log = prediction_log_pb2.PredictionLog()
      try:
        log.ParseFromString(raw)
      except Exception as e:  # protobuf's DecodeError
        raise errors.invalid_argument(f"Malformed PredictionLog in warmup file {path}: {e}") from e
      _replay(bundle, log)
  logging.info(
    "Finished reading warmup data for model at %s. Number of warmup records read: %d. Elapsed time (microseconds): %d.",
    bundle.path,
    len(records),
    int((time.monotonic() - start) * 1e6),
  )
  return len(records)


def _replay(bundle: saved_model_bundle.SavedModelBundle, log: prediction_log_pb2.PredictionLog) -> None:
  kind = log.WhichOneof("log_type")
  if kind == "predict_log":
    predict_util.run_predict(bundle, log.predict_log.request)
  elif kind == "classify_log":
    classifier.run_classify(bundle, log.classify_log.request)
  elif kind == "regress_log":
    regressor.run_regress(bundle, log.regress_log.request)
  elif kind == "multi_inference_log":
    multi_inference.run_multi_inference(bundle, log.multi_inference_log.request)
  else:
    raise errors.ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported log_type for warmup: {kind}")
