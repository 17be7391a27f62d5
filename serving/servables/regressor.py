"""Regress: feeds tf.Examples to a regress signature, reads its outputs."""

from collections.abc import Sequence

import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import regression_pb2

from serving import errors
from serving.servables import input_util, predict_util

OUTPUTS_KEY = "outputs"


def check_outputs(signature: meta_graph_pb2.SignatureDef) -> None:
  """Requires a regression signature's one output, "outputs"."""
  if len(signature.outputs) != 1:
    raise errors.invalid_argument("Expected one output Tensor.")
  if OUTPUTS_KEY not in signature.outputs:
    raise errors.invalid_argument(f"No regression outputs found in SignatureDef: {signature}")


def output_fetches(signature: meta_graph_pb2.SignatureDef) -> tuple[list[str], list[str]]:
  """Returns (output keys, tensor names) of a regression signature."""
  return [OUTPUTS_KEY], [signature.outputs[OUTPUTS_KEY].name]


def fill_result(
  keys: Sequence[str], values: Sequence[np.ndarray], num_examples: int, result: regression_pb2.RegressionResult
) -> None:
  """Converts the output tensor into a RegressionResult."""
  del keys  # A regression signature has exactly one output.
  value = values[0]
  if not (value.ndim == 1 or (value.ndim == 2 and value.shape[1] == 1)):
    raise errors.invalid_argument(
      f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got {list(value.shape)}"
    )
  if value.shape[0] != num_examples:
    raise errors.invalid_argument(
      f"Input batch size did not match output batch size: {num_examples} vs. {value.shape[0]}"
    )
  if value.dtype != np.float32:
    raise errors.invalid_argument(f"Expected output Tensor of DT_FLOAT.  Got: {value.dtype}")
  for v in value.reshape(-1):
    result.regressions.add(value=float(v))


API = input_util.ExamplesApi(
  "regress",
  predict_util.REGRESS_METHOD,
  "regression",
  regression_pb2.RegressionResponse,
  check_outputs,
  output_fetches,
  fill_result,
)
# Regress on one loaded servable: `run_regress(bundle, request, timeout_ms=None, method_name_check=False)`.
run_regress = API.run
