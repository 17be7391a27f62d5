"""fgr-loadtest reads a JSONL requests file as fgr-query does: values typed by the signature, strings filled."""

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

from clients import query


def test_a_left_out_string_scalar_is_sent_as_a_scalar():
  """A left-out string knob (`diversity` []) went as [""], refused for its shape without naming the knob."""
  scalar = meta_graph_pb2.TensorInfo(dtype=tf.string.as_datatype_enum)
  inputs = {"diversity": scalar}
  request = query.predict_request(query.complete_features({}, inputs), query.model_spec("m", "s"), inputs)
  value = tf.make_ndarray(request.inputs["diversity"])
  assert value.shape == () and value == np.array(b"", dtype=object)
