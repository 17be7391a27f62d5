"""MultiInference: several classify/regress signatures in one session run."""

from tensorflow_serving.apis import inference_pb2

from serving import errors
from serving.servables import classifier, input_util, predict_util, regressor, saved_model_bundle

# A task's method_name -> the API that runs it.
_APIS = {api.method_name: api for api in (classifier.API, regressor.API)}


def run_multi_inference(
  bundle: saved_model_bundle.SavedModelBundle,
  request: inference_pb2.MultiInferenceRequest,
  timeout_ms: int | None = None,
  method_name_check: bool = False,
) -> inference_pb2.MultiInferenceResponse:
  """Runs every task's signature on the shared input in one session call.

  Args:
    bundle: The servable.
    request: The request; each task's method_name picks classify or regress.
    timeout_ms: Milliseconds to the call's deadline, if any (a batch wait's bound).
    method_name_check: Also require each signature to declare its task's
      method (TF Serving's --enable_signature_method_name_check).
  """
  validate_tasks(request)
  seen = set()
  plans = []  # (task, signature name, signature, output keys, fetches)
  input_name = None
  for task in request.tasks:
    signature_name = task.model_spec.signature_name or saved_model_bundle.DEFAULT_SERVING_SIGNATURE
    if signature_name in seen:
      raise errors.invalid_argument(f"Duplicate evaluation of signature: {signature_name}")
    seen.add(signature_name)
    if signature_name not in bundle.signature_defs:
      raise errors.invalid_argument(f"Requested signature not found in model graph: {signature_name}").with_context(
        bundle.context(signature_name)
      )
    signature = bundle.signature_defs[signature_name]
    try:
      if task.method_name not in _APIS:
        raise errors.invalid_argument(f"Unsupported signature method_name: {task.method_name}")
      api = _APIS[task.method_name]
      api.check_signature(signature, method_name_check)
      keys, fetches = api.output_fetches(signature)
      name = signature.inputs[input_util.INPUTS_KEY].name
      if input_name is not None and name != input_name:
        raise errors.invalid_argument("Input tensor must be the same for all Signatures.")
    except errors.ServingError as e:
      raise e.with_context(bundle.context(signature_name)) from e
    input_name = name
    plans.append((task, signature_name, keys, fetches))

  context = bundle.context(",".join(p[1] for p in plans))
  try:
    examples = input_util.serialized_examples(request.input)
    all_fetches: list[str] = [f for plan in plans for f in plan[3]]
    values = bundle.runner({input_name: examples}, all_fetches, timeout_ms)
  except Exception as e:  # Every failure names the servable and signatures.
    raise errors.from_exception(e, context) from e

  response = inference_pb2.MultiInferenceResponse()
  offset = 0
  for task, signature_name, keys, fetches in plans:
    task_values = values[offset : offset + len(fetches)]
    offset += len(fetches)
    result = response.results.add()
    bundle.fill_model_spec(result.model_spec, signature_name)
    target = (
      result.classification_result if task.method_name == predict_util.CLASSIFY_METHOD else result.regression_result
    )
    try:
      _APIS[task.method_name].fill_result(keys, task_values, len(examples), target)
    except errors.ServingError as e:
      raise e.with_context(bundle.context(signature_name)) from e
  return response


def validate_tasks(request: inference_pb2.MultiInferenceRequest) -> str:
  """Checks the tasks address one model; returns its name.

  The servable (and so the version) is resolved from the first task's
  ModelSpec by the caller.
  """
  if not request.tasks:
    raise errors.invalid_argument("MultiInferenceRequest must contain at least one task.")
  name = request.tasks[0].model_spec.name
  for task in request.tasks:
    if not task.model_spec.name:
      raise errors.invalid_argument("Found ModelSpec with an empty model name.")
    if task.model_spec.name != name:
      raise errors.invalid_argument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
  return name
