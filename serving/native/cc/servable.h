// A loaded version as requests see it: its signatures, and its session behind batch queues.
#ifndef FGR_NATIVE_SERVABLE_H_
#define FGR_NATIVE_SERVABLE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "batching.h"
#include "metrics.h"
#include "session.h"

namespace fgr {

struct SignatureInput {
  std::string tensor;
  int dtype = 0;
  bool known_rank = false;
  std::vector<int64_t> dims;  // -1: any size.
};

struct SignatureOutput {
  std::string tensor;
  int dtype = 0;
};

struct Signature {
  std::string method_name;
  std::map<std::string, SignatureInput> inputs;  // By alias, sorted as the Python path sorts them.
  std::map<std::string, SignatureOutput> outputs;
  std::optional<int64_t> max_elements, max_bytes;  // One request's expansion limits.
};

// (max elements, max bytes) a batch of the named feeds may hold; nullopt: no limit.
using BatchBudget =
    std::function<std::pair<std::optional<int64_t>, std::optional<int64_t>>(const std::vector<std::string>&)>;

struct BatchingConfig {
  std::shared_ptr<BatchScheduler> scheduler;
  BatchOptions options;
  BatchBudget budget;  // Empty: rows only.
};

// Owned by a shared_ptr: its batch queues hold it until their queued batches have run.
class Servable : public std::enable_shared_from_this<Servable> {
 public:
  Servable(std::shared_ptr<Session> session, std::string model, int64_t version,
           std::map<std::string, Signature> signatures, std::optional<BatchingConfig> batching,
           std::shared_ptr<Metrics> metrics);
  ~Servable();

  const std::string& model() const { return model_; }
  int64_t version() const { return version_; }
  bool batching() const { return batching_.has_value(); }
  const Signature* FindSignature(const std::string& name) const;
  // "model: m, version: v[, signature: s]", as servable_context() writes it.
  std::string Context(const std::string& signature = "") const;

  // Where a call that is not batched runs: `run_whole` runs it and calls its `done`.
  using Elsewhere = std::function<void(std::function<void()> run_whole)>;

  // Runs `fetches` given `feeds` (by tensor name) and calls `done` once, maybe before returning.
  // A batchable call is queued (the task is returned, so that its caller may abandon it); any other
  // call runs whole, as BatchingSession runs it: through `elsewhere` when given, else in the calling
  // thread. `in_caller_thread` is for that whole run only; batches follow BatchOptions::in_caller_thread.
  // `timeout_ms` (< 0: none) is a queued task's deadline: past it the task is answered
  // DEADLINE_EXCEEDED and left out of its batch. No run is cut short once started (Session::Run).
  TaskPtr Run(std::vector<std::string> feed_names, std::vector<TensorPtr> feeds, std::vector<std::string> fetches,
              int64_t timeout_ms, bool in_caller_thread, Task::Done done, const Elsewhere& elsewhere = nullptr);

  // Holds the servable for one request from its resolution to its answer, so that Close() waits for
  // it (a swap fails no request that resolved the old version). False once closing.
  bool Acquire();
  void Release();

  // Waits for the requests holding the servable, then detaches the batch queues (queued batches still
  // run); later runs fail with UNAVAILABLE. The session stays open: its owner closes it.
  void Close();

 private:
  struct Kind;  // One queue's feeds and fetches.
  std::shared_ptr<BatchQueue> Queue(const std::string& key, const std::shared_ptr<Kind>& kind);
  void Process(const std::string& key, const std::shared_ptr<Kind>& kind, std::vector<TaskPtr> tasks);
  void RunAlone(const Kind& kind, const std::vector<TaskPtr>& tasks, const Status* error);
  Status RunNow(const std::vector<std::string>& feed_names, const std::vector<TensorPtr>& feeds,
                const std::vector<std::string>& fetches, bool in_caller_thread, std::vector<TensorPtr>* outputs);
  Status Unloaded() const;

  const std::shared_ptr<Session> session_;
  const std::string model_;
  const int64_t version_;
  const std::map<std::string, Signature> signatures_;
  const std::optional<BatchingConfig> batching_;
  const std::shared_ptr<Metrics> metrics_;
  std::mutex mutex_;
  std::condition_variable released_;
  int64_t holds_ = 0;
  bool closing_ = false;
  bool closed_ = false;
  std::map<std::string, std::shared_ptr<BatchQueue>> queues_;
  std::set<std::string> unbatchable_;  // Kinds whose outputs turned out not to be per-row.
};

}  // namespace fgr

#endif  // FGR_NATIVE_SERVABLE_H_
