"""fgr-query fills a history feature a request leaves out to the history's length, as the towers read it."""

from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from clients import query


def _input(rank: int) -> meta_graph_pb2.TensorInfo:
  shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=-1)] * rank)
  return meta_graph_pb2.TensorInfo(dtype=types_pb2.DT_STRING, tensor_shape=shape)


_INPUTS = {"hist_ids": _input(2), "hist_categories": _input(2), "hist_brands": _input(2), "query_tokens": _input(2)}


def test_a_left_out_history_feature_takes_the_history_length():
  """It went as [""], one entry beside two clicks, which the towers refuse as lengths [2 2 1]."""
  completed = query.complete_features({"hist_ids": ["ad3", "ad53"], "hist_categories": ["c3", "c3"]}, _INPUTS)
  assert completed["hist_brands"] == ["", ""] and completed["query_tokens"] == [""]


def test_rows_of_a_batch_keep_their_lengths():
  completed = query.complete_features({"hist_ids": [["a", "b", ""], ["c", "", ""]]}, _INPUTS)
  assert completed["hist_categories"] == [["", "", ""], ["", "", ""]]


def test_without_any_history_every_feature_is_one_empty_entry():
  completed = query.complete_features({"query_tokens": ["t1"]}, _INPUTS)
  assert completed["hist_ids"] == completed["hist_brands"] == [""]
