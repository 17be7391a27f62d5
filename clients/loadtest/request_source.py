"""Where load-test requests come from: recorded files or held-out synthetic queries.

Recorded requests are a TFRecord of serialised `PredictRequest`s (or of `PredictionLog`s, the format of
TF Serving's warm-up file `assets.extra/tf_serving_warmup_requests`), or JSONL with one feature dict per
line (feature name to a value or a list, as `fgr-query --requests_file` reads: fgr-loadtest types them by the
signature, `loadtest_cli.signature_typed_requests`; here they are checked and sent as strings). Synthetic
requests are held-out query features from the project's synthetic search-ads generator.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf import message
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2


def _string_value(name: str, value: Any) -> bytes:
  """One element of a string tensor: text as UTF-8 (what TF's string ops and the REST API expect)."""
  if isinstance(value, bytes):
    return value
  if isinstance(value, str):
    return value.encode("utf-8")
  if isinstance(value, (list, tuple, np.ndarray)):
    raise ValueError(f"feature {name!r}: nested lists must all have the same length")
  if isinstance(value, (bool, int, float, np.number, np.bool_)):
    return str(value).encode("utf-8")  # A number goes as its text: a JSON id 123 is sent as "123".
  raise ValueError(f"feature {name!r}: values must be strings or lists of strings, got {type(value).__name__}")


def features_request(features: dict[str, Any]) -> predict_pb2.PredictRequest:
  """A batch-of-one PredictRequest of string tensors: a scalar becomes a [1] tensor, a list a [1, n] tensor.

  Raises:
    ValueError: a value is not a string, a number or an evenly nested list of them (the message names it).
  """
  request = predict_pb2.PredictRequest()
  for name, value in features.items():
    request.inputs[name].CopyFrom(tf.make_tensor_proto(string_array(name, [value]), dtype=tf.string))
  return request


def string_array(name: str, value: Any) -> np.ndarray:
  """`value` (a string, a number or an evenly nested list of them) as an object array of UTF-8 bytes.

  Raises:
    ValueError: naming feature `name`, for a ragged list or a value of another type.
  """
  # dtype=object keeps a ragged list's rows as list elements, which _string_value then refuses.
  values = np.asarray(value, dtype=object)
  return np.asarray(np.frompyfunc(functools.partial(_string_value, name), 1, 1)(values), dtype=object)


def batch_requests(features: dict[str, np.ndarray], count: int | None = None) -> list[predict_pb2.PredictRequest]:
  """One batch-of-one request per row of a dict of feature arrays (all with the same first dimension)."""
  rows = len(next(iter(features.values())))
  return [
    features_request({name: values[i] for name, values in features.items()})
    for i in range(rows if count is None else min(rows, count))
  ]


def _parse_record(record: bytes) -> predict_pb2.PredictRequest:
  """A TFRecord entry as a PredictRequest, whether it holds a PredictionLog or a bare PredictRequest."""
  log = prediction_log_pb2.PredictionLog()
  try:
    log.ParseFromString(record)
    if log.HasField("predict_log") and log.predict_log.request.inputs:
      return log.predict_log.request
  except Exception:  # pylint: disable=broad-except  # Not a PredictionLog: try the bare request below.
    pass
  request = predict_pb2.PredictRequest()
  try:
    request.ParseFromString(record)
  except message.DecodeError:
    request.Clear()
  if not request.inputs:
    raise ValueError("neither a PredictionLog with a Predict request nor a PredictRequest")
  return request


def _jsonl_requests(path: str) -> list[tuple[dict[str, Any], predict_pb2.PredictRequest]]:
  """(feature dict, its request) per non-empty line of a JSON Lines file; a bad line is a ValueError naming it."""
  records = []
  try:
    with open(path, "rb") as f:
      for number, raw in enumerate(f, 1):
        where = f"{path}:{number}"
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError:
          raise ValueError(f"{where}: not UTF-8 text") from None
        if not line.strip():
          continue
        try:
          features = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(features, dict):
          raise ValueError(f"{where}: a request must be a JSON object of features")
        try:
          records.append((features, features_request(features)))
        except ValueError as e:
          raise ValueError(f"{where}: {e}") from None
  except OSError as e:  # Missing, a directory, unreadable.
    raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
  return records


def _tfrecord_requests(path: str) -> list[predict_pb2.PredictRequest]:
  """The requests of a TFRecord file; a missing, unreadable or non-TFRecord file or a bad entry is a ValueError."""
  # Checked first: otherwise TensorFlow reports them from inside the dataset op, with its node names.
  if not tf.io.gfile.exists(path):
    raise ValueError(f"cannot read {path}: No such file or directory")
  if tf.io.gfile.isdir(path):
    raise ValueError(f"cannot read {path}: Is a directory")
  requests = []
  try:
    for number, record in enumerate(tf.data.TFRecordDataset(path), 1):
      try:
        requests.append(_parse_record(record.numpy()))
      except ValueError as e:
        raise ValueError(f"{path}: record {number}: {e}") from None
  except tf.errors.DataLossError as e:
    raise ValueError(
      f"{path} is not a TFRecord file ({_tf_reason(e)}); a JSONL file's name must end in .jsonl or .json"
    ) from None
  except tf.errors.OpError as e:
    raise ValueError(f"cannot read {path}: {_tf_reason(e)}") from None
  return requests


def _tf_reason(error: tf.errors.OpError) -> str:
  """A TensorFlow error's message without its function-node and op decorations."""
  return re.sub(r"\{\{function_node [^}]*\}\}|\[Op:[^\]]*\]( name: \S*)?", "", error.message).strip()


def read_feature_lines(path: str) -> list[dict[str, Any]]:
  """One feature dict per non-empty line of a JSON Lines file.

  Its own reader, not the training logs' (`models.data.logs`): replaying recorded requests needs no
  data layer (see `synthetic_requests`).

  Raises:
    ValueError: the file can't be read, holds no requests, or a line is not a JSON object of features
      that `features_request` can send (the message names the file and line).
  """
  features = [features for features, _ in _jsonl_requests(path)]
  if not features:
    raise ValueError(f"{path} holds no requests")
  return features


def is_jsonl(path: str) -> bool:
  """Whether a requests file is read as JSON Lines of feature dicts (by its name), not as TFRecord."""
  return path.endswith((".jsonl", ".json"))


def read_requests_file(path: str, limit: int | None = None) -> list[predict_pb2.PredictRequest]:
  """Reads recorded requests: `.jsonl`/`.json` as feature dicts, anything else as TFRecord.

  Raises:
    ValueError: the file can't be read, holds no requests, or holds a bad one (the message names it).
  """
  if is_jsonl(path):
    requests = [request for _, request in _jsonl_requests(path)]
  else:
    requests = _tfrecord_requests(path)
  requests = requests[:limit] if limit else requests
  if not requests:
    raise ValueError(f"{path} holds no requests")
  return requests


def synthetic_requests(
  count: int, run_dir: str | None = None, num_ads: int = 20_000, seed: int = 0
) -> list[predict_pb2.PredictRequest]:
  """Held-out query features from the synthetic generator.

  Args:
    count: number of distinct requests.
    run_dir: an `fgr-train --output_dir`; its data spec is used, so queries match the served model's
      catalog. Without it, a synthetic log of `num_ads` ads with `seed`.
    num_ads: catalog size when there is no run_dir.
    seed: generator seed when there is no run_dir.
  """
  # The data layer is imported here, so replaying recorded requests does not need it. A client may
  # use the training code's data layer; the server (serving/) never imports it.
  from models.data import queries as queries_lib  # pylint: disable=g-import-not-at-top
  from models.data import sources

  if run_dir:
    with open(f"{run_dir}/config.json", encoding="utf-8") as f:
      spec = sources.DataSpec.from_json(json.load(f)["data"])
  else:
    spec = sources.DataSpec(
      name="synthetic", synthetic={"num_ads": num_ads, "seed": seed, "num_sessions": max(10 * count, 2000)}
    )
  return batch_requests(queries_lib.held_out_queries(sources.open_source(spec), count))


def with_model_spec(
  requests: list[predict_pb2.PredictRequest], model_name: str | None, signature_name: str | None, version: int | None
) -> list[predict_pb2.PredictRequest]:
  """Copies of the requests addressed to a model; None leaves a request's own field unchanged."""
  out = []
  for request in requests:
    copy = predict_pb2.PredictRequest()
    copy.CopyFrom(request)
    if model_name is not None:
      copy.model_spec.name = model_name
    if signature_name is not None:
      copy.model_spec.signature_name = signature_name
    if version is not None:
      copy.model_spec.version.value = version
    out.append(copy)
  return out
