#include "session.h"

#include <cstdlib>
#include <utility>

namespace fgr {
namespace {

struct StatusHolder {
  TF_Status* status = tf().TF_NewStatus();
  ~StatusHolder() { tf().TF_DeleteStatus(status); }
  Status ToStatus() const {
    return Status(static_cast<int>(tf().TF_GetCode(status)), tf().TF_Message(status));
  }
  bool ok() const { return tf().TF_GetCode(status) == TF_OK; }
};

void AppendVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

// A serialized tensorflow.RunOptions. Written by hand: this module must not link TF's own
// config.proto classes, and one field needs no generated code. Field number from config.proto:
// inter_op_thread_pool = 3 (int32, negative ones sign-extended). No timeout_in_ms: see Session::Run.
std::string RunOptionsBytes(bool in_caller_thread) {
  std::string bytes;
  if (in_caller_thread) {
    bytes.push_back(static_cast<char>(3 << 3));
    AppendVarint(static_cast<uint64_t>(int64_t{-1}), &bytes);
  }
  return bytes;
}

}  // namespace

Session::Session(TF_Session* session, TF_Graph* graph, std::string meta_graph_def)
    : session_(session), graph_(graph), meta_graph_def_(std::move(meta_graph_def)) {}

std::unique_ptr<Session> Session::Load(const std::string& export_dir, const std::vector<std::string>& tags,
                                       const std::string& config, Status* status) {
  const TfApi& api = tf();
  StatusHolder holder;
  TF_SessionOptions* options = api.TF_NewSessionOptions();
  if (!config.empty()) {
    api.TF_SetConfig(options, config.data(), config.size(), holder.status);
    if (!holder.ok()) {
      *status = holder.ToStatus();
      api.TF_DeleteSessionOptions(options);
      return nullptr;
    }
  }
  std::vector<const char*> tag_pointers;
  for (const std::string& tag : tags) tag_pointers.push_back(tag.c_str());
  TF_Graph* graph = api.TF_NewGraph();
  TF_Buffer* meta_graph = api.TF_NewBuffer();
  // The restore and init ops run in the loading thread, which the caller may keep at idle priority
  // on one CPU, instead of on the inter-op pool that answers requests (saved_model_bundle does the
  // same on the Python path).
  const std::string load_options = RunOptionsBytes(/*in_caller_thread=*/true);
  const TF_Buffer load_run_options{load_options.data(), load_options.size(), nullptr};
  TF_Session* session =
      api.TF_LoadSessionFromSavedModel(options, &load_run_options, export_dir.c_str(), tag_pointers.data(),
                                       static_cast<int>(tag_pointers.size()), graph, meta_graph, holder.status);
  api.TF_DeleteSessionOptions(options);
  if (!holder.ok()) {
    *status = holder.ToStatus();
    api.TF_DeleteBuffer(meta_graph);
    api.TF_DeleteGraph(graph);
    return nullptr;
  }
  std::string meta_graph_bytes(static_cast<const char*>(meta_graph->data), meta_graph->length);
  api.TF_DeleteBuffer(meta_graph);
  *status = Status();
  return std::unique_ptr<Session>(new Session(session, graph, std::move(meta_graph_bytes)));
}

Session::~Session() { Close(); }

Status Session::Resolve(const std::string& name, TF_Output* output, std::string* canonical) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = resolved_.find(name);
  if (found != resolved_.end()) {
    *output = found->second.first;
    *canonical = found->second.second;
    return Status();
  }
  std::string op = name;
  int index = 0;
  const size_t colon = name.rfind(':');
  if (colon != std::string::npos) {
    char* end = nullptr;
    const long parsed = std::strtol(name.c_str() + colon + 1, &end, 10);
    if (end != name.c_str() + colon + 1 && *end == '\0' && parsed >= 0) {
      op = name.substr(0, colon);
      index = static_cast<int>(parsed);
    }
  }
  TF_Operation* operation = tf().TF_GraphOperationByName(graph_, op.c_str());
  if (operation == nullptr || index >= tf().TF_OperationNumOutputs(operation)) {
    return Status(kInvalidArgument, name + " is not a tensor of the graph");
  }
  *output = TF_Output{operation, index};
  *canonical = op + ":" + std::to_string(index);
  resolved_.emplace(name, std::make_pair(*output, *canonical));
  return Status();
}

Status Session::Run(const std::vector<std::string>& feed_names, const std::vector<TensorPtr>& feeds,
                    const std::vector<std::string>& fetch_names, bool in_caller_thread,
                    std::vector<TensorPtr>* outputs) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return Status(kUnavailable, "The servable has been unloaded");
    ++in_flight_;
  }
  struct Release {
    Session* self;
    ~Release() {
      std::lock_guard<std::mutex> lock(self->mutex_);
      if (--self->in_flight_ == 0) self->idle_.notify_all();
    }
  } release{this};

  std::vector<TF_Output> inputs(feed_names.size());
  std::vector<TF_Tensor*> input_values(feed_names.size());
  std::unordered_map<std::string, size_t> fed;  // Canonical name -> feed index.
  for (size_t i = 0; i < feed_names.size(); ++i) {
    std::string canonical;
    Status status = Resolve(feed_names[i], &inputs[i], &canonical);
    if (!status.ok()) return status;
    fed.emplace(canonical, i);
    input_values[i] = feeds[i]->get();
  }
  std::vector<TF_Output> fetches;
  std::vector<long> sources;  // >= 0: index among fetches; < 0: -(feed index) - 1.
  for (const std::string& name : fetch_names) {
    TF_Output output;
    std::string canonical;
    Status status = Resolve(name, &output, &canonical);
    if (!status.ok()) return status;
    auto feed = fed.find(canonical);
    if (feed != fed.end()) {
      sources.push_back(-static_cast<long>(feed->second) - 1);
    } else {
      sources.push_back(static_cast<long>(fetches.size()));
      fetches.push_back(output);
    }
  }
  const std::string options = RunOptionsBytes(in_caller_thread);
  TF_Buffer run_options{options.data(), options.size(), nullptr};
  std::vector<TF_Tensor*> values(fetches.size(), nullptr);
  StatusHolder holder;
  tf().TF_SessionRun(session_, options.empty() ? nullptr : &run_options, inputs.data(), input_values.data(),
                     static_cast<int>(inputs.size()), fetches.data(), values.data(), static_cast<int>(fetches.size()),
                     nullptr, 0, nullptr, holder.status);
  std::vector<TensorPtr> owned;
  for (TF_Tensor* value : values) owned.push_back(value ? std::make_shared<Tensor>(value) : nullptr);
  if (!holder.ok()) return holder.ToStatus();
  outputs->clear();
  for (long source : sources) outputs->push_back(source >= 0 ? owned[source] : feeds[-source - 1]);
  return Status();
}

void Session::Close() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (closed_) return;
  closed_ = true;
  idle_.wait(lock, [this] { return in_flight_ == 0; });
  lock.unlock();
  StatusHolder holder;
  tf().TF_CloseSession(session_, holder.status);
  tf().TF_DeleteSession(session_, holder.status);
  tf().TF_DeleteGraph(graph_);
}

}  // namespace fgr
