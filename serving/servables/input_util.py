"""Feeds a tensorflow.serving.Input (tf.Examples) to classify/regress
signatures."""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import input_pb2

from serving import errors

# Classify/Regress signatures take their examples under this input key.
INPUTS_KEY = "inputs"


def serialized_examples(model_input: input_pb2.Input) -> np.ndarray:
  """Returns a 1-D object array of serialized tf.Examples.

  With ExampleListWithContext, each example is the context's bytes followed
  by the example's bytes, which parses as the merge of the two (TF Serving
  feeds exactly this).

  Raises:
    ServingError: INVALID_ARGUMENT "Input is empty." when there is nothing.
  """
  kind = model_input.WhichOneof("kind")
  if kind == "example_list":
    values = [e.SerializeToString() for e in model_input.example_list.examples]
  elif kind == "example_list_with_context":
    with_context = model_input.example_list_with_context
    context = with_context.context.SerializeToString()
    values = [context + e.SerializeToString() for e in with_context.examples]
  else:
    values = []
  if not values:
    raise errors.invalid_argument("Input is empty.")
  array = np.empty(len(values), dtype=object)
  array[:] = values
  return array


def check_examples_signature(
  signature: meta_graph_pb2.SignatureDef, method_name: str, kind: str, method_name_check: bool = False
) -> None:
  """Checks a classify/regress signature's one string input (and method).

  As TF Serving, the signature's method_name is checked only under
  --enable_signature_method_name_check: `tf.saved_model.save` declares every
  signature `tensorflow/serving/predict`, so TF2-native classify and regress
  signatures are recognised by their inputs and outputs alone.

  Args:
    signature: The signature a Classify/Regress request names.
    method_name: The method it must declare when `method_name_check` is set.
    kind: "classification" or "regression", for TF Serving's messages.
    method_name_check: TF Serving's --enable_signature_method_name_check.
  """
  if method_name_check and signature.method_name != method_name:
    raise errors.invalid_argument(
      f"Expected {kind} signature method_name to be {method_name}. Was: {signature.method_name}"
    )
  if len(signature.inputs) != 1:
    raise errors.invalid_argument("Expected one input Tensor.")
  if INPUTS_KEY not in signature.inputs:
    raise errors.invalid_argument(f"No {kind} inputs found in SignatureDef: {signature}")
  if signature.inputs[INPUTS_KEY].dtype != types_pb2.DT_STRING:
    raise errors.invalid_argument(
      f"Expected {kind} input Tensor of DT_STRING (serialized "
      f"tf.Examples), got "
      f"{types_pb2.DataType.Name(signature.inputs[INPUTS_KEY].dtype)}"
    )


# (signature) -> None: raises unless the signature has the outputs the API reads.
CheckOutputs = Callable[[meta_graph_pb2.SignatureDef], None]
# (signature) -> (output keys, tensor names) to fetch.
OutputFetches = Callable[[meta_graph_pb2.SignatureDef], tuple[list[str], list[str]]]
# (output keys, values, number of examples, result message) -> None.
FillResult = Callable[[Sequence[str], Sequence[np.ndarray], int, Any], None]


@dataclasses.dataclass(frozen=True)
class ExamplesApi:
  """What Classify and Regress differ in; both feed tf.Examples to one signature the same way.

  Attributes:
    name: "classify" or "regress", as metrics and logs name the API.
    method_name: The signature method TF Serving's --enable_signature_method_name_check requires.
    kind: "classification" or "regression", as TF Serving's error messages name the signature.
    response_type: ClassificationResponse or RegressionResponse.
    check_outputs: Validates the signature's outputs for this API.
    output_fetches: Picks the outputs to fetch.
    fill_result: Converts the fetched values into `response.result`.
  """

  name: str
  method_name: str
  kind: str
  response_type: type
  check_outputs: CheckOutputs
  output_fetches: OutputFetches
  fill_result: FillResult

  def check_signature(self, signature: meta_graph_pb2.SignatureDef, method_name_check: bool = False) -> None:
    """Validates a signature for this API as TF Serving's classifier or regressor does.

    Args:
      signature: The signature a request (or MultiInference task) names.
      method_name_check: Also require `method_name` (TF Serving's --enable_signature_method_name_check).
    """
    check_examples_signature(signature, self.method_name, self.kind, method_name_check)
    self.check_outputs(signature)

  def run(self, bundle, request, timeout_ms: int | None = None, method_name_check: bool = False):
    """Runs a ClassificationRequest or RegressionRequest on one loaded servable.

    Args:
      bundle: The SavedModelBundle serving the request.
      request: The request, of this API's kind.
      timeout_ms: Milliseconds to the call's deadline, if any (a batch wait's bound).
      method_name_check: TF Serving's --enable_signature_method_name_check.
    """
    response = self.response_type()
    name, signature = bundle.signature(request.model_spec.signature_name)
    try:
      self.check_signature(signature, method_name_check)
      examples = serialized_examples(request.input)
      keys, fetches = self.output_fetches(signature)
      feeds = {signature.inputs[INPUTS_KEY].name: examples}
      values = bundle.runner(feeds, fetches, timeout_ms)
      self.fill_result(keys, values, len(examples), response.result)
    except Exception as e:  # Every failure names the servable and signature.
      raise errors.from_exception(e, bundle.context(name)) from e
    bundle.fill_model_spec(response.model_spec, name)
    return response
