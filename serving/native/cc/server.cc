#include "server.h"

#include <algorithm>
#include <chrono>
#include <set>
#include <stdexcept>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>

#include "tensorflow_serving/apis/predict.pb.h"

namespace fgr {
namespace {

constexpr char kPredictMethod[] = "/tensorflow.serving.PredictionService/Predict";
constexpr char kDefaultSignature[] = "serving_default";
const char* const kHealthServices[] = {"", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"};
const std::set<std::string> kPredictMethods = {"tensorflow/serving/predict", "tensorflow/serving/classify",
                                               "tensorflow/serving/regress"};

std::string ToString(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (!buffer.Dump(&slices).ok()) return bytes;
  bytes.reserve(buffer.Length());
  for (const grpc::Slice& slice : slices) bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return bytes;
}

bool Encodable(int dtype) {
  return NativeDtype(dtype) || dtype == TF_HALF || dtype == TF_BFLOAT16 || dtype == TF_COMPLEX64 ||
         dtype == TF_COMPLEX128;
}

// What a request tensor expands to, priced from what it declares (request_limits.tensor_cost) for
// the exact tensors the fast path takes.
bool Price(const tensorflow::TensorProto& proto, int64_t* elements, int64_t* bytes) {
  int64_t n = 1;
  for (const auto& dim : proto.tensor_shape().dim()) {
    if (dim.size() < 0) return false;
    if (dim.size() > 0 && n > (int64_t{1} << 40) / dim.size()) return false;
    n *= dim.size();
  }
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

}  // namespace

bool Admission::TryAcquire() {
  if (in_flight_.fetch_add(1) >= limit_) {
    in_flight_.fetch_sub(1);
    return false;
  }
  return true;
}

// One RPC: reads its single request, then answers once, from whichever thread finishes it.
//
// A cancelled call (the client went away, or its deadline passed) is finished at once, so that
// shutdown never waits for work it no longer needs: a batch that waits out a long timeout, or a
// Python fallback. The work still finishes later; it then finds the call answered and leaves it.
class Server::Call : public grpc::ServerGenericBidiReactor {
 public:
  // Shared with the work done for the call, which may outlive it.
  struct State {
    std::mutex mutex;
    Call* call = nullptr;            // Null once gRPC is done with the call.
    bool answered = false;           // Finish has been called (or the call is gone).
    TaskPtr task;                    // Its queued batch task, if any.
    std::function<void()> release;   // Returns what the request holds (servable, admission).
    Counted<Live::kCall> counted;

    // Runs `release` once, whoever calls first (the answer or a cancellation).
    void Release() {
      std::function<void()> run;
      {
        std::lock_guard<std::mutex> lock(mutex);
        run.swap(release);
      }
      if (run) run();
    }
  };

  Call(Server* server, grpc::GenericCallbackServerContext* context)
      : server_(server), context_(context), started_(Clock::now()), state_(std::make_shared<State>()) {
    state_->call = this;
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Answer(state_, grpc::Status(grpc::StatusCode::INTERNAL, "No request message"), "");
      return;
    }
    bytes_ = ToString(request_);
    request_.Clear();
    server_->Handle(this);
  }

  void OnCancel() override {
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      if (state_->task) state_->task->abandoned = true;
    }
    Answer(state_, grpc::Status(grpc::StatusCode::CANCELLED, "Cancelled"), "");
    state_->Release();
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      state_->call = nullptr;
      state_->answered = true;
    }
    delete this;
  }

  // Answers the call unless it was answered already; the call may be gone once this returns.
  static void Answer(const std::shared_ptr<State>& state, const grpc::Status& status, const std::string& response) {
    Call* call;
    {
      std::lock_guard<std::mutex> lock(state->mutex);
      if (state->answered) return;
      state->answered = true;
      call = state->call;
      // A queued task's `done` holds this state: drop the state's hold on the task, or the two would
      // keep each other (and the request, its tensors and outputs) alive forever.
      state->task.reset();
    }
    // gRPC calls OnDone only after Finish, so the call is alive until this returns.
    if (!status.ok()) {
      call->Finish(status);
      return;
    }
    grpc::Slice slice(response);
    call->response_ = grpc::ByteBuffer(&slice, 1);
    call->StartWriteAndFinish(&call->response_, grpc::WriteOptions(), grpc::Status::OK);
  }

  // Milliseconds until the client's deadline (the session-run timeout), or -1 for none.
  int64_t TimeoutMs() const {
    const auto deadline = context_->deadline();
    if (deadline == std::chrono::system_clock::time_point::max()) return -1;
    const auto remaining = deadline - std::chrono::system_clock::now();
    if (remaining > std::chrono::hours(24 * 365 * 3)) return -1;  // ~1e8 s: no deadline.
    return std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::milliseconds>(remaining).count());
  }

  const std::string& method() const { return context_->method(); }
  const std::string& bytes() const { return bytes_; }
  Clock::time_point started() const { return started_; }
  const std::shared_ptr<State>& state() const { return state_; }

 private:
  Server* server_;
  grpc::GenericCallbackServerContext* context_;
  const Clock::time_point started_;
  const std::shared_ptr<State> state_;
  grpc::ByteBuffer request_, response_;
  std::string bytes_;
};

namespace {

// Answers a Predict the fast path took: returns what it held, counts it, adds the servable and
// signature to an error as the Python path does.
void Respond(const std::shared_ptr<Server::Call::State>& state, Clock::time_point started, Metrics* metrics,
             const std::string& model, const std::string& signature, const std::shared_ptr<Servable>& servable,
             const Status& status, const std::string& response) {
  state->Release();
  const double latency_us = std::chrono::duration<double, std::micro>(Clock::now() - started).count();
  if (metrics) metrics->RecordRequest(model, "predict", "GRPC", CodeName(status.code), latency_us);
  if (!status.ok()) {
    const std::string message = servable ? WithContext(status.message, servable->Context(signature)) : status.message;
    Server::Call::Answer(state, grpc::Status(static_cast<grpc::StatusCode>(status.code), message), "");
    return;
  }
  Server::Call::Answer(state, grpc::Status::OK, response);
}

}  // namespace

namespace {

class GenericService : public grpc::CallbackGenericService {
 public:
  explicit GenericService(Server* server) : server_(server) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* context) override {
    return new Server::Call(server_, context);
  }

 private:
  Server* server_;
};

}  // namespace

Server::Server(ServerOptions options, ::fgr::Fallback fallback, std::shared_ptr<Metrics> metrics,
               std::shared_ptr<Admission> admission)
    : options_(std::move(options)),
      fallback_(std::move(fallback)),
      metrics_(std::move(metrics)),
      admission_(std::move(admission)),
      fallback_pool_(options_.num_fallback_threads),
      run_pool_(options_.num_fallback_threads) {}

Server::~Server() { Shutdown(0); }

void Server::AddPort(const std::string& address) { addresses_.push_back(address); }

std::vector<int> Server::Start() {
  grpc::EnableDefaultHealthCheckService(options_.enable_health);
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> tls;
  if (options_.tls) {
    grpc::SslServerCredentialsOptions ssl(options_.client_verify
                                              ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                              : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    ssl.pem_root_certs = options_.ca_pem;
    ssl.pem_key_cert_pairs.push_back({options_.key_pem, options_.cert_pem});
    tls = grpc::SslServerCredentials(ssl);
  }
  for (const std::string& address : addresses_) {
    // UNIX sockets stay plaintext: local, guarded by file permissions (as the Python path).
    const bool unix_socket = address.rfind("unix:", 0) == 0;
    ports_.push_back(std::make_unique<int>(0));
    builder.AddListeningPort(address, tls && !unix_socket ? tls : grpc::InsecureServerCredentials(),
                             ports_.back().get());
  }
  builder.SetMaxReceiveMessageSize(options_.max_receive_message_length);
  builder.SetMaxSendMessageSize(-1);
  for (const auto& [name, value] : options_.channel_args) {
    if (std::holds_alternative<int>(value)) {
      builder.AddChannelArgument(name, std::get<int>(value));
    } else {
      builder.AddChannelArgument(name, std::get<std::string>(value));
    }
  }
  service_ = std::make_unique<GenericService>(this);
  builder.RegisterCallbackGenericService(service_.get());
  server_ = builder.BuildAndStart();
  if (!server_) {
    std::string joined;
    for (const std::string& address : addresses_) joined += (joined.empty() ? "" : ", ") + address;
    throw std::runtime_error("Failed to bind gRPC server to " + joined);
  }
  std::vector<int> ports;
  for (size_t i = 0; i < addresses_.size(); ++i) {
    const bool unix_socket = addresses_[i].rfind("unix:", 0) == 0;
    if (*ports_[i] == 0 && !unix_socket) {
      Shutdown(0);
      throw std::runtime_error("Failed to bind gRPC server to " + addresses_[i]);
    }
    ports.push_back(*ports_[i]);
  }
  SetServing(true);
  return ports;
}

void Server::SetModel(const std::string& name, std::map<int64_t, std::shared_ptr<Servable>> versions,
                      std::map<std::string, int64_t> labels) {
  std::lock_guard<std::mutex> lock(routes_mutex_);
  auto routes = std::make_shared<Routes>(*routes_);  // Copy on write: readers keep their snapshot.
  if (versions.empty()) {
    routes->erase(name);
  } else {
    (*routes)[name] = Model{std::move(versions), std::move(labels)};
  }
  routes_ = std::move(routes);
}

void Server::SetServing(bool serving) {
  if (!server_ || !options_.enable_health) return;
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  for (const char* service : kHealthServices) health->SetServingStatus(service, serving);
}

void Server::Shutdown(double grace_seconds) {
  std::lock_guard<std::mutex> lock(shutdown_mutex_);
  if (shut_down_) return;
  shut_down_ = true;
  if (server_) {
    SetServing(false);
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::microseconds(static_cast<int64_t>(std::max(0.0, grace_seconds) * 1e6)));
  }
  fallback_pool_.Stop();
  run_pool_.Stop();
}

void Server::Handle(Call* call) {
  if (call->method() == kPredictMethod && TryPredict(call)) return;
  Fallback(call);
}

void Server::Fallback(Call* call) {
  fallback_pool_.Post([this, state = call->state(), method = call->method(), bytes = call->bytes(),
                       timeout_ms = call->TimeoutMs()] {
    {
      std::lock_guard<std::mutex> lock(state->mutex);
      if (state->answered) return;  // Cancelled while it waited: nobody wants the answer.
    }
    FallbackResult result;
    try {
      result = fallback_(method, bytes, timeout_ms);
    } catch (const std::exception& e) {  // Never lose a call: the Python side failed to answer.
      result = FallbackResult{kInternal, std::string("Fallback failed: ") + e.what(), ""};
    }
    Call::Answer(state, grpc::Status(static_cast<grpc::StatusCode>(result.code), result.message), result.response);
  });
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
    Respond(call->state(), call->started(), metrics_.get(), spec.name(), "", nullptr, status, "");
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
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    state->release = [servable, admission = admission_] {
      servable->Release();
      if (admission) admission->Release();
    };
  }
  auto done = [this, state, started = call->started(), request, servable, signature_name,
               aliases = std::move(aliases),
               dtypes = std::move(dtypes)](const Status& status, std::vector<TensorSlice> outputs) {
    // `request` is captured: string inputs are views of its memory until the run is over.
    if (!status.ok()) {
      Respond(state, started, metrics_.get(), servable->model(), signature_name, servable, status, "");
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
    Respond(state, started, metrics_.get(), servable->model(), signature_name, servable, status, response.SerializeAsString());
  };
  auto run = [servable, feed_names = std::move(feed_names), feeds = std::move(feeds), fetches = std::move(fetches),
              timeout_ms, state, done = std::move(done)]() mutable {
    {
      std::lock_guard<std::mutex> lock(state->mutex);
      if (state->answered) return;  // Cancelled before it ran (OnCancel returned its holds).
    }
    TaskPtr task = servable->Run(std::move(feed_names), std::move(feeds), std::move(fetches), timeout_ms, false,
                                 std::move(done));
    if (task) {  // Queued: a cancelled call leaves its rows out of the batch.
      std::lock_guard<std::mutex> lock(state->mutex);
      if (state->answered) {
        task->abandoned = true;  // Cancelled meanwhile (or done already: then this changes nothing).
      } else {
        state->task = task;  // Answer() drops it again, so it never outlives the call's answer.
      }
    }
  };
  if (servable->batching()) {
    run();  // Queues (or, for odd shapes, runs) here; batch threads do the work.
  } else {
    run_pool_.Post(std::move(run));  // A session run must not hold a gRPC thread.
  }
  return true;
}

}  // namespace fgr
