"""DirectSession answers as Session.run does, without its per-call Python."""

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2

from serving import errors
from serving.servables import direct_session


@pytest.fixture(name="session")
def _session():
  graph = tf.Graph()
  with graph.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
    words = tf.compat.v1.placeholder(tf.string, [None], name="words")
    tf.identity(x * 2.0 + 1.0, name="y")
    tf.strings.length(words, name="lengths")
    tf.no_op(name="NoOp")  # What a SavedModel's __saved_model_init_op signature names.
  graph.finalize()
  session = tf.compat.v1.Session(graph=graph)
  yield session
  session.close()


def test_matches_session_run(session):
  direct = direct_session.DirectSession(session)
  direct.extend()
  feeds = {"x:0": np.array([[1.0, 2.0]], np.float32), "words:0": np.array([b"ab", b"abc"], object)}
  fetches = ["lengths:0", "y:0"]
  expected = session.run(fetches, feed_dict=feeds)
  got = direct.run(feeds, fetches)
  assert [g.tolist() for g in got] == [e.tolist() for e in expected]
  # Lists are converted to the tensor's dtype, as Session.run does.
  assert direct.run({"x:0": [[0.0, 1.0]]}, ["y:0"])[0].tolist() == [[1.0, 3.0]]
  options = config_pb2.RunOptions(timeout_in_ms=5000)
  assert direct.run({"x:0": [[0.0, 1.0]]}, ["y:0"], options)[0].shape == (1, 2)


def test_a_fetch_that_is_fed_returns_the_fed_value(session):
  direct = direct_session.DirectSession(session)
  direct.extend()
  y, x = direct.run({"x:0": [[3.0, 4.0]]}, ["y:0", "x:0"])
  assert y.tolist() == [[7.0, 9.0]] and x.tolist() == [[3.0, 4.0]]


def test_bad_feeds_fail_before_the_run(session):
  direct = direct_session.DirectSession(session)
  direct.extend()
  for feeds, fetches, message in (
    ({"x:0": np.zeros((1, 3), np.float32)}, ["y:0"], "Cannot feed value of shape"),
    ({"nope:0": [1.0]}, ["y:0"], "nope:0 is not a tensor of the graph"),
    ({"x:0": [[3.0, 4.0]]}, ["NoOp"], "NoOp is not a tensor of the graph"),  # An op, not a tensor.
  ):
    with pytest.raises(errors.ServingError, match=message) as info:
      direct.run(feeds, fetches)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
  with pytest.raises(tf.errors.InvalidArgumentError):  # y needs x.
    direct.run({"words:0": [b"a"]}, ["y:0"])
