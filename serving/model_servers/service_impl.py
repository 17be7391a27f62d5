"""The RPC implementations shared by the gRPC and REST front ends."""

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from absl import logging
from tensorflow_serving.apis import (
  classification_pb2,
  get_model_metadata_pb2,
  get_model_status_pb2,
  inference_pb2,
  input_pb2,
  model_management_pb2,
  model_pb2,
  predict_pb2,
  regression_pb2,
)

from serving import errors
from serving.core import server_core
from serving.monitoring import metrics as metrics_lib
from serving.servables import (
  classifier,
  get_model_metadata,
  input_util,
  multi_inference,
  predict_util,
  regressor,
  request_limits,
  saved_model_bundle,
)

R = TypeVar("R")
# Raises to refuse a request whose inputs ({alias: Cost}) expand too far.
CostCheck = Callable[[dict[str, request_limits.Cost]], None]


def predict_batch_size(request: predict_pb2.PredictRequest) -> int:
  """Rows in a PredictRequest: the largest dim 0 among its inputs' shapes."""
  return max((t.tensor_shape.dim[0].size for t in request.inputs.values() if t.tensor_shape.dim), default=0)


def examples_batch_size(model_input: input_pb2.Input) -> int:
  """Examples in a Classify/Regress/MultiInference input."""
  kind = model_input.WhichOneof("kind")
  if kind == "example_list":
    return len(model_input.example_list.examples)
  if kind == "example_list_with_context":
    return len(model_input.example_list_with_context.examples)
  return 0


# A gRPC call cancelled this close to its deadline counts as DEADLINE_EXCEEDED: the client cancels
# at its own deadline, which comes a little before the server's (set when the call's headers were
# read, later than the client sent them). As the native data plane (call.h).
DEADLINE_SLACK_SECONDS = 0.1


class _SemaphoreAdmission:
  """--max_in_flight_requests within this process's Python front ends."""

  def __init__(self, limit: int):
    semaphore = threading.BoundedSemaphore(limit)
    self.release = semaphore.release
    self._acquire = semaphore.acquire

  def try_acquire(self) -> bool:
    return self._acquire(blocking=False)


def _require_model_spec(request: Any) -> None:
  """TF Serving's first check of every request that names a model (e.g. predict_impl.cc)."""
  if not request.HasField("model_spec"):
    raise errors.invalid_argument("Missing ModelSpec")


async def _run_in(executor: concurrent.futures.Executor, function: Callable[..., R], *args) -> R:
  """Runs `function` on `executor`. If the awaiting RPC is cancelled (its
  deadline passed, or its client went away) before a worker took the call, it
  never runs; once running, it is waited for, so the caller's servable handle
  outlives the session call (a run is not cut short: see
  SavedModelBundle.session_run)."""
  work = executor.submit(function, *args)
  future = asyncio.wrap_future(work)
  try:
    return await asyncio.shield(future)
  except asyncio.CancelledError:
    if not work.cancel():  # Running or done: wait for it.
      await asyncio.wait([future])
    raise


class ServingApi:
  """Resolves servables, runs requests and records metrics.

  Every method raises `errors.ServingError` with TF Serving's code; anything
  else a request triggers is converted into one, so no request can take
  the server down.

  Args:
    core: The server core.
    metrics: Metrics to record into.
    method_name_check: TF Serving's --enable_signature_method_name_check.
    as_tensor_content: TF Serving's --enable_serialization_as_tensor_content.
    max_batch_size_per_request: Rows (or examples) one inference request may
      carry; larger ones fail with INVALID_ARGUMENT. 0 means no limit.
    max_in_flight_requests: Requests run at once (both front ends); one more
      fails at once with RESOURCE_EXHAUSTED instead of queueing. 0: no limit.
    expansion_limits: Elements and bytes one request may expand to, checked
      from what it declares before any input is decoded.
    admission: Where the --max_in_flight_requests slots are held, if not in
      this object: the native data plane's `Admission`, so that requests its
      front end answers count against the same limit (`try_acquire() ->
      bool`, `release()`).
  """

  def __init__(
    self,
    core: server_core.ServerCore,
    metrics: metrics_lib.Metrics,
    method_name_check: bool = False,
    as_tensor_content: bool = False,
    max_batch_size_per_request: int = 0,
    max_in_flight_requests: int = 0,
    expansion_limits: request_limits.ExpansionLimits | None = None,
    admission: Any = None,
  ):
    self.core = core
    self.metrics = metrics
    self._method_name_check = method_name_check
    self._as_tensor_content = as_tensor_content
    self._max_batch = max(0, max_batch_size_per_request)
    self._max_in_flight = max(0, max_in_flight_requests)
    self._in_flight = None
    if admission is not None:
      self._in_flight = admission
    elif self._max_in_flight:
      self._in_flight = _SemaphoreAdmission(self._max_in_flight)
    self._limits = expansion_limits or request_limits.ExpansionLimits()
    # Servable -> {signature name: its request limits}, priced once.
    self._signature_limits = weakref.WeakKeyDictionary()

  @contextlib.contextmanager
  def _admit(self) -> Iterator[None]:
    """Holds one of --max_in_flight_requests slots, or fails without one."""
    if self._in_flight is None:
      yield
      return
    if not self._in_flight.try_acquire():
      raise errors.resource_exhausted(
        f"Too many requests in flight: the limit is {self._max_in_flight} (--max_in_flight_requests); retry later"
      )
    try:
      yield
    finally:
      self._in_flight.release()

  def _check_batch_size(self, rows: int, model_spec: model_pb2.ModelSpec) -> None:
    if self._max_batch and rows > self._max_batch:
      raise errors.invalid_argument(
        f"Request batch size {rows} exceeds the maximum of "
        f"{self._max_batch} rows per request (--max_batch_size_per_request)"
        f" [model {model_spec.name}]"
      )

  def _predict_rows(self, request: predict_pb2.PredictRequest) -> int:
    """The request's rows where --max_batch_size_per_request limits them
    (reading every input's shape costs ~5% of a Predict's Python time)."""
    return predict_batch_size(request) if self._max_batch else 0

  def _check_expansion(self, bundle, signature_name: str, costs: Callable[[], dict[str, request_limits.Cost]]) -> None:
    """Raises RESOURCE_EXHAUSTED if the request's inputs (`costs()`, by
    alias) expand beyond the signature's limits. Unknown signatures are left
    for the request's own path to report in its words."""
    name = signature_name or saved_model_bundle.DEFAULT_SERVING_SIGNATURE
    by_name = self._signature_limits.get(bundle)
    if by_name is None:
      by_name = self._signature_limits.setdefault(bundle, {})
    limits = by_name.get(name)
    if limits is None:
      signature = bundle.signature_defs.get(name)
      if signature is None:
        return
      limits = by_name[name] = self._limits.request_limits(signature)
    try:
      priced = costs()
    except errors.ServingError as e:  # Malformed: name servable, signature.
      raise e.with_context(bundle.context(name)) from e
    self._limits.check(priced, limits, bundle.context(name))

  def _predict_costs(self, request: predict_pb2.PredictRequest) -> dict[str, request_limits.Cost]:
    costs = {}
    # By alias, as input_feeds decodes them: a map's order varies from one process to the next, and
    # the error (the first malformed input, the largest of equal ones) must not vary with it.
    for alias in sorted(request.inputs):
      cost = request_limits.tensor_cost(request.inputs[alias], alias)
      if cost is not None:
        costs[alias] = cost
    return costs

  def _check_predict(self, bundle, request: predict_pb2.PredictRequest) -> None:
    # The inputs' names first, as TF Serving checks them before any value: an unknown alias is that,
    # whatever its size or shape.
    name = request.model_spec.signature_name or saved_model_bundle.DEFAULT_SERVING_SIGNATURE
    signature = bundle.signature_defs.get(name)
    if signature is not None:
      try:
        predict_util.check_input_names(signature, request.inputs)
      except errors.ServingError as e:
        raise e.with_context(bundle.context(name)) from e
    self._check_expansion(bundle, request.model_spec.signature_name, lambda: self._predict_costs(request))

  def _check_examples(self, bundle, signature_name: str, model_input: input_pb2.Input) -> None:
    self._check_expansion(
      bundle, signature_name, lambda: {input_util.INPUTS_KEY: request_limits.examples_cost(model_input)}
    )

  @contextlib.contextmanager
  def _serving(
    self,
    api: str,
    entrypoint: str,
    model_spec: model_pb2.ModelSpec,
    rows: int = 0,
    check: Callable[[Any], None] | None = None,
    timeout_ms: int | None = None,
  ) -> Iterator[Any]:
    """Admits a request, holds its servable, converts and records failures.

    `check(bundle)` vets the request against its servable before it runs.
    `timeout_ms`: the time left to the gRPC client's deadline when the call
    began. A call still running at its deadline counts as DEADLINE_EXCEEDED,
    which its client got from gRPC, whatever the run returns later.
    """
    start = time.monotonic()
    # A gRPC client gives up at its deadline by itself; REST's (--rest_api_timeout_in_ms) is kept here.
    deadline = start + timeout_ms / 1000 if timeout_ms is not None and entrypoint != "REST" else None
    status = "OK"
    try:
      self._check_batch_size(rows, model_spec)
      with self._admit(), self.core.servable_handle(model_spec) as bundle:
        if check is not None:
          check(bundle)
        yield bundle
      if entrypoint == "REST" and timeout_ms is not None and time.monotonic() - start > timeout_ms / 1000:
        # TF Serving's run would have been cut at the timeout (RunOptions.timeout_in_ms, which runs
        # here don't get: see serving/README.md, "Deadlines"); its answer is the same 504.
        raise errors.ServingError(
          grpc.StatusCode.DEADLINE_EXCEEDED, f"Deadline exceeded: the call took longer than {timeout_ms} ms"
        )
    except Exception as e:
      # No local holds the error: this frame is in its traceback, and would keep it, and the
      # request, in a reference cycle. A ServingError goes on as it is (`raise error from e` with
      # error being e would make it its own cause, another cycle).
      status = errors.from_exception(e).code.name
      if status in ("INTERNAL", "UNKNOWN"):
        logging.exception("%s failed", api)
      if isinstance(e, errors.ServingError):
        raise
      raise errors.from_exception(e) from e
    except asyncio.CancelledError:  # The deadline passed, or the client went away.
      near_deadline = deadline is not None and time.monotonic() + DEADLINE_SLACK_SECONDS >= deadline
      status = "DEADLINE_EXCEEDED" if near_deadline else "CANCELLED"
      raise
    finally:
      if deadline is not None and time.monotonic() >= deadline:
        # The client had its deadline's answer by then. No slack here, unlike a cancellation: an
        # answer just before the deadline may well have reached the client.
        status = "DEADLINE_EXCEEDED"
      model = model_spec.name if self.core.has_model(model_spec.name) else metrics_lib.UNKNOWN_MODEL
      self.metrics.record_request(model, api, entrypoint, status, time.monotonic() - start)

  def _call(
    self,
    api: str,
    entrypoint: str,
    model_spec: model_pb2.ModelSpec,
    run: Callable[..., R],
    rows: int = 0,
    check: Callable[[Any], None] | None = None,
    timeout_ms: int | None = None,
  ) -> R:
    with self._serving(api, entrypoint, model_spec, rows, check, timeout_ms) as bundle:
      return run(bundle)

  def _call_examples(
    self,
    api: str,
    entrypoint: str,
    model_spec: model_pb2.ModelSpec,
    model_input: input_pb2.Input,
    run: Callable[..., R],
    timeout_ms: int | None = None,
  ) -> R:
    """`_call` for Classify, Regress and MultiInference: their examples'
    count and expansion are checked before `run(bundle)`."""
    return self._call(
      api,
      entrypoint,
      model_spec,
      run,
      examples_batch_size(model_input),
      lambda b: self._check_examples(b, model_spec.signature_name, model_input),
      timeout_ms,
    )

  def predict(
    self, request: predict_pb2.PredictRequest, timeout_ms: int | None = None, entrypoint: str = "GRPC"
  ) -> predict_pb2.PredictResponse:
    """PredictionService.Predict."""
    _require_model_spec(request)
    return self._call(
      "predict",
      entrypoint,
      request.model_spec,
      lambda b: predict_util.run_predict(b, request, timeout_ms, self._method_name_check, self._as_tensor_content),
      self._predict_rows(request),
      lambda b: self._check_predict(b, request),
      timeout_ms,
    )

  def predict_built(
    self,
    model_spec: model_pb2.ModelSpec,
    build: Callable[[Any, CostCheck], predict_pb2.PredictRequest],
    timeout_ms: int | None = None,
    entrypoint: str = "REST",
  ) -> predict_pb2.PredictResponse:
    """PredictionService.Predict for a front end that builds the request
    from the servable's signature (REST types JSON values by it).

    The servable is resolved once, under the same admission and metrics as
    `predict`. `build(bundle, check_costs)` builds the request against that
    servable, calling `check_costs({alias: Cost})` before it decodes any
    input, and the same servable runs it: a version swap meanwhile can't pair
    one version's signature with the next one's session.
    """

    def run(bundle) -> predict_pb2.PredictResponse:
      request = build(bundle, lambda costs: self._check_expansion(bundle, model_spec.signature_name, lambda: costs))
      self._check_batch_size(self._predict_rows(request), model_spec)
      return predict_util.run_predict(bundle, request, timeout_ms, self._method_name_check, self._as_tensor_content)

    return self._call("predict", entrypoint, model_spec, run)

  async def predict_async(
    self,
    request: predict_pb2.PredictRequest,
    timeout_ms: int | None,
    executor: concurrent.futures.Executor,
    entrypoint: str = "GRPC",
  ) -> predict_pb2.PredictResponse:
    """PredictionService.Predict on an asyncio loop.

    Validation and the response run on the loop. A batched call waits in its
    batch queue without a thread of its own; an unbatched one runs the
    session on `executor`.
    """
    _require_model_spec(request)
    loop = asyncio.get_running_loop()
    with self._serving(
      "predict",
      entrypoint,
      request.model_spec,
      self._predict_rows(request),
      lambda b: self._check_predict(b, request),
      timeout_ms,
    ) as bundle:
      prepared = predict_util.prepare_predict(bundle, request, self._method_name_check)
      try:
        schedule = getattr(bundle.runner, "schedule", None)
        task = None if schedule is None else schedule(prepared.feeds, prepared.fetches, timeout_ms, loop)
        if task is not None:
          values = await task.wait_async(timeout_ms)
        else:
          runner = getattr(bundle.runner, "runner", bundle.runner)
          values = await _run_in(executor, runner, prepared.feeds, prepared.fetches, timeout_ms)
      except Exception as e:  # Every failure names servable and signature.
        raise errors.from_exception(e, bundle.context(prepared.signature_name)) from e
      return predict_util.predict_response(bundle, prepared, values, self._as_tensor_content)

  def _examples(
    self,
    api: input_util.ExamplesApi,
    request: classification_pb2.ClassificationRequest | regression_pb2.RegressionRequest,
    timeout_ms: int | None = None,
    entrypoint: str = "GRPC",
  ) -> classification_pb2.ClassificationResponse | regression_pb2.RegressionResponse:
    """PredictionService.Classify or .Regress, as `api` (classifier.API or regressor.API) runs it."""
    _require_model_spec(request)
    return self._call_examples(
      api.name,
      entrypoint,
      request.model_spec,
      request.input,
      lambda b: api.run(b, request, timeout_ms, self._method_name_check),
      timeout_ms,
    )

  # `classify(request, timeout_ms=None, entrypoint="GRPC")`, a ClassificationRequest to its response.
  classify = functools.partialmethod(_examples, classifier.API)
  # `regress(request, timeout_ms=None, entrypoint="GRPC")`, a RegressionRequest to its response.
  regress = functools.partialmethod(_examples, regressor.API)

  def multi_inference(
    self, request: inference_pb2.MultiInferenceRequest, timeout_ms: int | None = None, entrypoint: str = "GRPC"
  ) -> inference_pb2.MultiInferenceResponse:
    """PredictionService.MultiInference (one model, one version)."""
    multi_inference.validate_tasks(request)
    return self._call_examples(  # Every task shares the input.
      "multi_inference",
      entrypoint,
      request.tasks[0].model_spec,
      request.input,
      lambda b: multi_inference.run_multi_inference(b, request, timeout_ms, self._method_name_check),
      timeout_ms,
    )

  def get_model_metadata(
    self, request: get_model_metadata_pb2.GetModelMetadataRequest, entrypoint: str = "GRPC"
  ) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """PredictionService.GetModelMetadata (signature_def)."""
    _require_model_spec(request)
    get_model_metadata.validate_request(request)
    return self._call("get_model_metadata", entrypoint, request.model_spec, get_model_metadata.model_metadata)

  def get_model_status(
    self, request: get_model_status_pb2.GetModelStatusRequest
  ) -> get_model_status_pb2.GetModelStatusResponse:
    """ModelService.GetModelStatus."""
    _require_model_spec(request)
    return self.core.model_status(request.model_spec)

  def reload_config(
    self, request: model_management_pb2.ReloadConfigRequest
  ) -> model_management_pb2.ReloadConfigResponse:
    """ModelService.HandleReloadConfigRequest.

    Returns the response with an OK status; raises on failure (the gRPC
    front end answers with the error code, as TF Serving does).
    """
    if request.config.WhichOneof("config") != "model_config_list":
      raise errors.invalid_argument(
        "ServerModelConfig type not supported by HandleReloadConfigRequest. Only ModelConfigList is currently supported"
      )
    self.core.reload_config(request.config)
    response = model_management_pb2.ReloadConfigResponse()
    response.status.error_code = 0
    return response
