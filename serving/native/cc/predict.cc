// A Predict the native side answers itself (Server::TryPredict).
//
// It takes a Predict only as it is: a served model, version and signature, inputs that match the
// signature and carry exactly their values, within the request limits. Whatever it declines goes
// to Python unchanged (server.cc's Fallback), holding nothing; whatever it takes, it answers.
#include <algorithm>
#include <chrono>
#include <set>

#include "call.h"
#include "server.h"
#include "tensorflow_serving/apis/predict.pb.h"

namespace fgr {
namespace {

constexpr char kDefaultSignature[] = "serving_default";
const std::set<std::string> kPredictMethods = {"tensorflow/serving/predict", "tensorflow/serving/classify",
                                               "tensorflow/serving/regress"};

bool Encodable(int dtype) {
  return NativeDtype(dtype) || dtype == TF_HALF || dtype == TF_BFLOAT16 || dtype == TF_COMPLEX64 ||
         dtype == TF_COMPLEX128;
}

// What a request tensor expands to, priced from what it declares (request_limits.tensor_cost) for
// the exact tensors the fast path takes.
bool Price(const tensorflow::TensorProto& proto, int64_t* elements, int64_t* bytes) {
  std::vector<int64_t> dims;
  int64_t n;
  if (!DeclaredShape(proto, &dims, &n)) return false;
  *elements += n;
  if (proto.dtype() == tensorflow::DT_STRING) {
    *bytes += static_cast<int64_t>(proto.ByteSizeLong());
  } else {
    *bytes += n * static_cast<int64_t>(tf().TF_DataTypeSize(static_cast<TF_DataType>(proto.dtype())));
  }
  return true;
}

std::string WithContext(const std::string& message, const std::string& context) {
  if (context.empty() || message.find(context) != std::string::npos) return message;
  return message + " [" + context + "]";
}

// The fast path takes the call: from here on it counts it, once (Respond, or a cancellation).
void Take(const std::shared_ptr<Server::Call::State>& state, Clock::time_point started, Metrics* metrics,
          const std::string& model) {
  if (!metrics) return;
  std::lock_guard<std::mutex> lock(state->mutex);
  state->record = [metrics, model, started](const std::string& code) {
    const double latency_us = std::chrono::duration<double, std::micro>(Clock::now() - started).count();
    metrics->RecordRequest(model, "predict", "GRPC", code, latency_us);
  };
}

// Answers a Predict the fast path took: returns what it held, counts it (unless its cancellation
// did), adds the servable and signature to an error as the Python path does.
void Respond(const std::shared_ptr<Server::Call::State>& state, const std::string& signature,
             const std::shared_ptr<Servable>& servable, const Status& status, const std::string& response) {
  state->Release();
  // Past its deadline the client has DEADLINE_EXCEEDED, whatever the run returned. (No slack here,
  // unlike a cancellation: an answer just before the deadline may well have reached the client.)
  state->Record(state->PastDeadline() ? "DEADLINE_EXCEEDED" : CodeName(status.code));
  if (!status.ok()) {
    const std::string message = servable ? WithContext(status.message, servable->Context(signature)) : status.message;
    Server::Call::Answer(state, grpc::Status(static_cast<grpc::StatusCode>(status.code), message), "");
    return;
  }
  Server::Call::Answer(state, grpc::Status::OK, response);
}

}  // namespace

bool Server::Routed(const std::string& model) {
  std::lock_guard<std::mutex> lock(routes_mutex_);
  return routes_->count(model) > 0;
}

std::shared_ptr<Servable> Server::Resolve(const void* spec_pointer) {
  const auto& spec = *static_cast<const tensorflow::serving::ModelSpec*>(spec_pointer);
  std::shared_ptr<const Routes> routes;
  {
    std::lock_guard<std::mutex> lock(routes_mutex_);
    routes = routes_;
  }
  auto model = routes->find(spec.name());
  if (model == routes->end()) return nullptr;
  const auto& versions = model->second.versions;
  int64_t version;
  switch (spec.version_choice_case()) {
    case tensorflow::serving::ModelSpec::kVersion:
      version = spec.version().value();
      break;
    case tensorflow::serving::ModelSpec::kVersionLabel: {
      auto label = model->second.labels.find(spec.version_label());
      if (label == model->second.labels.end()) return nullptr;
      version = label->second;
      break;
    }
    default:
      return versions.rbegin()->second;  // The latest available version.
  }
  auto found = versions.find(version);
  return found == versions.end() ? nullptr : found->second;
}

bool Server::TryPredict(Call* call) {
  auto request = std::make_shared<tensorflow::serving::PredictRequest>();
  if (!request->ParseFromString(call->bytes())) return false;
  const auto& spec = request->model_spec();
  if (options_.max_batch_size_per_request > 0) {
    int64_t rows = 0;
    for (const auto& [alias, tensor] : request->inputs()) {
      if (tensor.tensor_shape().dim_size() > 0) rows = std::max(rows, tensor.tensor_shape().dim(0).size());
    }
    if (rows > options_.max_batch_size_per_request) return false;
  }
  if (admission_ && !admission_->TryAcquire()) {
    const Status status(kResourceExhausted, "Too many requests in flight: the limit is " +
                                                std::to_string(admission_->limit()) +
                                                " (--max_in_flight_requests); retry later");
    // The client's name becomes a label only if it is a routed model: every label is a set of series
    // kept for good (metrics.cc), so made-up names would grow the server. Others count under "", as on
    // the Python path. (A configured model with no AVAILABLE version is not routed, so it counts
    // under "" here where Python would name it; no other name is labelled differently.)
    Take(call->state(), call->started(), metrics_.get(), Routed(spec.name()) ? spec.name() : std::string());
    Respond(call->state(), "", nullptr, status, "");
    return true;
  }
  auto decline = [this]() {
    if (admission_) admission_->Release();
    return false;
  };
  std::shared_ptr<Servable> servable = Resolve(&spec);
  if (!servable || !servable->Acquire()) return decline();  // Closing: Python answers for it.
  auto decline_held = [&]() {
    servable->Release();
    return decline();
  };
  const std::string signature_name = spec.signature_name().empty() ? kDefaultSignature : spec.signature_name();
  const Signature* signature = servable->FindSignature(signature_name);
  if (signature == nullptr) return decline_held();
  if (options_.method_name_check && !kPredictMethods.count(signature->method_name)) return decline_held();
  if (signature->max_elements || signature->max_bytes) {
    int64_t elements = 0, bytes = 0;
    for (const auto& [alias, tensor] : request->inputs()) {
      if (!NativeDtype(tensor.dtype()) || !Price(tensor, &elements, &bytes)) return decline_held();
    }
    if ((signature->max_elements && elements > *signature->max_elements) ||
        (signature->max_bytes && bytes > *signature->max_bytes)) {
      return decline_held();
    }
  }
  if (static_cast<size_t>(request->inputs_size()) != signature->inputs.size()) return decline_held();
  std::vector<std::string> feed_names;
  std::vector<TensorPtr> feeds;
  for (const auto& [alias, input] : signature->inputs) {
    auto found = request->inputs().find(alias);
    if (found == request->inputs().end() || found->second.dtype() != input.dtype) return decline_held();
    TensorPtr tensor;
    if (!DecodeExact(found->second, &tensor)) return decline_held();
    if (input.known_rank) {
      const auto& dims = tensor->dims();
      if (dims.size() != input.dims.size()) return decline_held();
      for (size_t d = 0; d < dims.size(); ++d) {
        if (input.dims[d] >= 0 && input.dims[d] != dims[d]) return decline_held();
      }
    }
    feed_names.push_back(input.tensor);
    feeds.push_back(std::move(tensor));
  }
  std::vector<std::string> aliases;
  if (request->output_filter_size() > 0) {
    std::set<std::string> seen;
    for (const std::string& alias : request->output_filter()) {
      if (!signature->outputs.count(alias) || !seen.insert(alias).second) return decline_held();
      aliases.push_back(alias);
    }
  } else {
    for (const auto& [alias, output] : signature->outputs) aliases.push_back(alias);
  }
  std::vector<std::string> fetches;
  std::vector<int> dtypes;
  for (const std::string& alias : aliases) {
    const SignatureOutput& output = signature->outputs.at(alias);
    if (!Encodable(output.dtype)) return decline_held();
    fetches.push_back(output.tensor);
    dtypes.push_back(output.dtype);
  }
  // From here on the fast path answers, whatever happens.
  const int64_t timeout_ms = call->TimeoutMs();
  const std::shared_ptr<Call::State>& state = call->state();
  Take(state, call->started(), metrics_.get(), servable->model());
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    state->release = [servable, admission = admission_] {
      servable->Release();
      if (admission) admission->Release();
    };
  }
  auto done = [this, state, request, servable, signature_name,
               aliases = std::move(aliases),
               dtypes = std::move(dtypes)](const Status& status, std::vector<TensorSlice> outputs) {
    // `request` is captured: string inputs are views of its memory until the run is over.
    if (!status.ok()) {
      Respond(state, signature_name, servable, status, "");
      return;
    }
    tensorflow::serving::PredictResponse response;
    auto* model_spec = response.mutable_model_spec();
    model_spec->set_name(servable->model());
    model_spec->mutable_version()->set_value(servable->version());
    model_spec->set_signature_name(signature_name);
    auto& response_outputs = *response.mutable_outputs();
    for (size_t i = 0; i < aliases.size(); ++i) {
      Encode(outputs[i], dtypes[i], options_.as_tensor_content, &response_outputs[aliases[i]]);
    }
    Respond(state, signature_name, servable, status, response.SerializeAsString());
  };
  // A call that is not batched runs on this thread once the event is handled, after another thread
  // takes over the queue (queue_workers.h), unless cancelled by then (OnCancel returned its holds).
  auto after_event = [this, state](std::function<void()> run_whole) {
    workers_->RunAfterEvent([state, run_whole = std::move(run_whole)] {
      {
        std::lock_guard<std::mutex> lock(state->mutex);
        if (state->answered) return;
      }
      run_whole();
    });
  };
  // A batchable call is queued here; batch threads do the work. Any other (every call without
  // batching; scalar or ragged feeds with it) runs after the event, never on the polling thread.
  TaskPtr task = servable->Run(std::move(feed_names), std::move(feeds), std::move(fetches), timeout_ms,
                               options_.unbatched_in_caller_thread, std::move(done), after_event);
  if (task) {  // Queued: a cancelled call leaves its rows out of the batch.
    std::lock_guard<std::mutex> lock(state->mutex);
    // A batch thread may have answered it already: then holding the task would keep it (and, through
    // its `done`, this state) alive for good. Else Answer() drops it, so it never outlives the answer.
    if (!state->answered) state->task = task;
  }
  return true;
}

}  // namespace fgr
