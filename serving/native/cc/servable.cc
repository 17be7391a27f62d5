#include "servable.h"

#include <algorithm>
#include <numeric>

namespace fgr {
namespace {

// Most kinds of calls (feed shapes x fetches) one servable batches; odd ones beyond run unbatched,
// so that they cannot slow every batch thread's scan (as batching_session.MAX_QUEUES).
constexpr size_t kMaxQueues = 64;

bool NoRetry(int code) { return code == kDeadlineExceeded || code == kCancelled || code == kUnavailable; }

Status Expired(const Task& task) {
  return Status(kDeadlineExceeded,
                "Deadline of " + std::to_string(task.timeout_ms) + " ms exceeded while waiting for a batch");
}

std::vector<TensorSlice> Whole(const std::vector<TensorPtr>& outputs) {
  std::vector<TensorSlice> slices;
  for (const TensorPtr& output : outputs) slices.push_back(TensorSlice{output, 0, -1});
  return slices;
}

void Cost(const std::vector<TensorPtr>& feeds, int64_t* elements, int64_t* bytes) {
  *elements = *bytes = 0;
  for (const TensorPtr& feed : feeds) {
    *elements += feed->elements();
    if (feed->dtype() == TF_STRING) {
      for (int64_t i = 0; i < feed->elements(); ++i) *bytes += tf().TF_StringGetSize(&feed->strings()[i]);
    } else {
      *bytes += feed->elements() * static_cast<int64_t>(feed->element_size());
    }
  }
}

}  // namespace

struct Servable::Kind {
  std::vector<std::string> feed_names;  // Sorted.
  std::vector<std::string> fetches;
};

Servable::Servable(std::shared_ptr<Session> session, std::string model, int64_t version,
                   std::map<std::string, Signature> signatures, std::optional<BatchingConfig> batching,
                   std::shared_ptr<Metrics> metrics)
    : session_(std::move(session)),
      model_(std::move(model)),
      version_(version),
      signatures_(std::move(signatures)),
      batching_(std::move(batching)),
      metrics_(std::move(metrics)) {}

Servable::~Servable() { Close(); }

const Signature* Servable::FindSignature(const std::string& name) const {
  auto found = signatures_.find(name);
  return found == signatures_.end() ? nullptr : &found->second;
}

std::string Servable::Context(const std::string& signature) const {
  std::string text = "model: " + model_ + ", version: " + std::to_string(version_);
  return signature.empty() ? text : text + ", signature: " + signature;
}

Status Servable::Unloaded() const { return Status(kUnavailable, "Servable " + Context() + " has been unloaded"); }

Status Servable::RunNow(const std::vector<std::string>& feed_names, const std::vector<TensorPtr>& feeds,
                        const std::vector<std::string>& fetches, bool in_caller_thread,
                        std::vector<TensorPtr>* outputs) {
  Status status = session_->Run(feed_names, feeds, fetches, in_caller_thread, outputs);
  if (status.code == kUnavailable && status.message == "The servable has been unloaded") return Unloaded();
  return status;
}

TaskPtr Servable::Run(std::vector<std::string> feed_names, std::vector<TensorPtr> feeds,
                      std::vector<std::string> fetches, int64_t timeout_ms, bool in_caller_thread, Task::Done done,
                      const Elsewhere& elsewhere) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) {
      done(Unloaded(), {});
      return nullptr;
    }
  }
  auto run_now = [&]() -> TaskPtr {
    auto run_whole = [self = shared_from_this(), feed_names = std::move(feed_names), feeds = std::move(feeds),
                      fetches = std::move(fetches), in_caller_thread, done = std::move(done)] {
      std::vector<TensorPtr> outputs;
      Status status = self->RunNow(feed_names, feeds, fetches, in_caller_thread, &outputs);
      done(status, status.ok() ? Whole(outputs) : std::vector<TensorSlice>{});
    };
    if (elsewhere) {
      elsewhere(std::move(run_whole));
    } else {
      run_whole();
    }
    return nullptr;
  };
  if (!batching_) return run_now();
  // Batchable: every feed has the same dim 0, above zero (scalars or disagreeing feeds could not be
  // split back per call, so they run on their own rather than fail).
  int64_t rows = -1;
  for (const TensorPtr& feed : feeds) {
    if (feed->dims().empty()) return run_now();
    if (rows >= 0 && feed->dims()[0] != rows) return run_now();
    rows = feed->dims()[0];
  }
  if (rows <= 0) return run_now();
  std::vector<size_t> order(feeds.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return feed_names[a] < feed_names[b]; });
  auto kind = std::make_shared<Kind>();
  std::string key;
  std::vector<TensorPtr> sorted_feeds;
  for (size_t i : order) {
    const TensorPtr& feed = feeds[i];
    kind->feed_names.push_back(feed_names[i]);
    sorted_feeds.push_back(feed);
    key += feed_names[i] + '\0' + std::to_string(feed->dtype()) + '\0';
    for (size_t d = 1; d < feed->dims().size(); ++d) {
      // Padded inputs share a queue whatever their inner sizes; only the rank must agree.
      key += batching_->options.pad_variable_length_inputs ? "?," : std::to_string(feed->dims()[d]) + ",";
    }
    key += '\1';
  }
  key += '\2';
  for (const std::string& fetch : fetches) key += fetch + '\0';
  kind->fetches = fetches;
  std::shared_ptr<BatchQueue> queue = Queue(key, kind);
  if (!queue) return run_now();
  auto task = std::make_shared<Task>();
  task->rows = rows;
  if (batching_->budget) {
    Cost(sorted_feeds, &task->elements, &task->bytes);
    if (batching_->options.pad_variable_length_inputs) {
      for (const TensorPtr& feed : sorted_feeds) {
        task->row_elements.push_back(feed->row_elements());
        task->pad_element_bytes.push_back(static_cast<int64_t>(feed->element_size()));
      }
    }
  }
  task->feeds = std::move(sorted_feeds);
  task->timeout_ms = timeout_ms;
  if (timeout_ms > 0) task->deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  task->done = std::move(done);
  Status status = queue->Schedule(task);
  if (!status.ok()) {
    task->done(status, {});
    return nullptr;
  }
  return task;
}

std::shared_ptr<BatchQueue> Servable::Queue(const std::string& key, const std::shared_ptr<Kind>& kind) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (unbatchable_.count(key)) return nullptr;
  auto found = queues_.find(key);
  if (found != queues_.end()) return found->second;
  if (queues_.size() >= kMaxQueues || closed_) return nullptr;
  std::optional<int64_t> max_elements, max_bytes;
  if (batching_->budget) std::tie(max_elements, max_bytes) = batching_->budget(kind->feed_names);
  auto queue = batching_->scheduler->AddQueue(batching_->options, max_elements, max_bytes,
                                              [self = shared_from_this(), key, kind](std::vector<TaskPtr> tasks) {
                                                self->Process(key, kind, std::move(tasks));
                                              });
  queues_.emplace(key, queue);
  return queue;
}

void Servable::Process(const std::string& key, const std::shared_ptr<Kind>& kind, std::vector<TaskPtr> tasks) {
  const Clock::time_point now = Clock::now();
  std::vector<TaskPtr> live;
  for (TaskPtr& task : tasks) {
    if (!task->Take()) {  // Abandoned: answered by its caller, and maybe dropped already (Task::Drop).
      if (task->done) task->done(Status(kCancelled, "The call was cancelled while waiting for a batch"), {});
    } else if (task->deadline <= now) {
      task->done(Expired(*task), {});
    } else {
      live.push_back(std::move(task));
    }
  }
  if (live.empty()) return;
  const BatchOptions& options = batching_->options;
  int64_t rows = 0;
  for (const TaskPtr& task : live) rows += task->rows;
  int64_t padded = rows;
  auto allowed = std::lower_bound(options.allowed_batch_sizes.begin(), options.allowed_batch_sizes.end(), rows);
  if (allowed != options.allowed_batch_sizes.end()) padded = *allowed;
  std::vector<TensorPtr> feeds;
  for (size_t f = 0; f < kind->feed_names.size(); ++f) {
    if (live.size() == 1 && padded == rows) {
      feeds.push_back(live[0]->feeds[f]);
      continue;
    }
    std::vector<TensorPtr> parts;
    for (const TaskPtr& task : live) parts.push_back(task->feeds[f]);
    feeds.push_back(Concat(parts, padded, options.pad_variable_length_inputs));
  }
  std::vector<TensorPtr> outputs;
  Status status = RunNow(kind->feed_names, feeds, kind->fetches, batching_->options.in_caller_thread, &outputs);
  if (!status.ok()) {  // Whatever failed, retry the calls one by one.
    RunAlone(*kind, live, &status);
    return;
  }
  for (const TensorPtr& output : outputs) {
    if (output->dims().empty() || output->dims()[0] != padded) {
      // TF Serving fails such calls; this stops batching them and answers each call on its own.
      {
        std::lock_guard<std::mutex> lock(mutex_);
        unbatchable_.insert(key);
      }
      RunAlone(*kind, live, nullptr);
      return;
    }
  }
  if (metrics_) metrics_->RecordBatch(model_, rows, padded - rows);
  int64_t offset = 0;
  for (const TaskPtr& task : live) {
    std::vector<TensorSlice> slices;
    for (const TensorPtr& output : outputs) slices.push_back(TensorSlice{output, offset, task->rows});
    offset += task->rows;
    task->done(Status(), std::move(slices));
  }
}

void Servable::RunAlone(const Kind& kind, const std::vector<TaskPtr>& tasks, const Status* error) {
  // One malformed call then fails alone instead of failing every call it was batched with.
  if (error != nullptr && (tasks.size() == 1 || NoRetry(error->code))) {
    FailAll(tasks, *error);
    return;
  }
  for (const TaskPtr& task : tasks) {
    // The batch's run took time: a call that gave up or passed its deadline meanwhile is not run.
    if (task->abandoned.load()) {
      task->done(Status(kCancelled, "The call was cancelled while waiting for a batch"), {});
      continue;
    }
    if (task->deadline <= Clock::now()) {
      task->done(Expired(*task), {});
      continue;
    }
    std::vector<TensorPtr> outputs;
    Status status = RunNow(kind.feed_names, task->feeds, kind.fetches, batching_->options.in_caller_thread, &outputs);
    task->done(status, status.ok() ? Whole(outputs) : std::vector<TensorSlice>{});
  }
}

bool Servable::Acquire() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closing_) return false;
  ++holds_;
  return true;
}

void Servable::Release() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (--holds_ == 0) released_.notify_all();
}

void Servable::Close() {
  std::map<std::string, std::shared_ptr<BatchQueue>> queues;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (closing_) return;
    closing_ = true;
    released_.wait(lock, [this] { return holds_ == 0; });
    closed_ = true;
    queues.swap(queues_);
  }
  for (auto& entry : queues) batching_->scheduler->RemoveQueue(entry.second);
}

}  // namespace fgr
