"""Classify: feeds tf.Examples to a classify signature, reads classes/scores."""

import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import classification_pb2

from serving import errors
from serving.servables import input_util, predict_util

CLASSES_KEY = "classes"
SCORES_KEY = "scores"


def check_outputs(signature: meta_graph_pb2.SignatureDef) -> None:
  """Requires "classes", "scores" or both among a classification signature's one or two outputs."""
  if len(signature.outputs) not in (1, 2):
    raise errors.invalid_argument(f"Expected one or two output Tensors, found {len(signature.outputs)}")
  if CLASSES_KEY not in signature.outputs and (SCORES_KEY not in signature.outputs):
    raise errors.invalid_argument(
      f"Expected classification signature outputs to contain at least one "
      f'of "{CLASSES_KEY}" or "{SCORES_KEY}". Signature was: '
      f"{signature}"
    )


def output_fetches(signature: meta_graph_pb2.SignatureDef) -> tuple[list[str], list[str]]:
  """Returns (output keys, tensor names) of a classification signature."""
  keys = [k for k in (CLASSES_KEY, SCORES_KEY) if k in signature.outputs]
  return keys, [signature.outputs[k].name for k in keys]


def _check_2d(name: str, value: np.ndarray, num_examples: int) -> None:
  if value.ndim != 2:
    raise errors.invalid_argument(f"Expected Tensor shape: [batch_size num_classes] but got {list(value.shape)}")
  if value.shape[0] != num_examples:
    raise errors.invalid_argument(f"Expected {name} output batch size of {num_examples}. Got: {value.shape[0]}")


def fill_result(
  keys: list[str], values: list[np.ndarray], num_examples: int, result: classification_pb2.ClassificationResult
) -> None:
  """Converts classes/scores tensors into a ClassificationResult."""
  outputs = dict(zip(keys, values))
  classes = outputs.get(CLASSES_KEY)
  scores = outputs.get(SCORES_KEY)
  if classes is not None:
    _check_2d("classes", classes, num_examples)
    if classes.dtype != object:
      raise errors.invalid_argument(f"Expected classes Tensor of DT_STRING. Got: {classes.dtype}")
  if scores is not None:
    _check_2d("scores", scores, num_examples)
    if scores.dtype != np.float32:
      raise errors.invalid_argument(f"Expected scores Tensor of DT_FLOAT. Got: {scores.dtype}")
  if classes is not None and scores is not None and (classes.shape[1] != scores.shape[1]):
    raise errors.invalid_argument(
      f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. {scores.shape[1]}"
    )
  num_classes = (classes if classes is not None else scores).shape[1]
  for i in range(num_examples):
    classifications = result.classifications.add()
    for j in range(num_classes):
      entry = classifications.classes.add()
      if classes is not None:
        entry.label = classes[i, j].decode("utf-8", errors="replace")
      if scores is not None:
        entry.score = float(scores[i, j])


API = input_util.ExamplesApi(
  "classify",
  predict_util.CLASSIFY_METHOD,
  "classification",
  classification_pb2.ClassificationResponse,
  check_outputs,
  output_fetches,
  fill_result,
)
# Classify on one loaded servable: `run_classify(bundle, request, timeout_ms=None, method_name_check=False)`.
run_classify = API.run
