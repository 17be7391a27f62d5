// TF Serving's SharedBatchScheduler: many queues, one pool of batch threads.
//
// Each queue collects tasks into batches of at most max_batch_size rows (and, if set, elements and
// bytes); a batch goes to a free batch thread once it is full or its oldest task has waited
// batch_timeout_micros; a queue holding max_enqueued_batches batches refuses new tasks with
// UNAVAILABLE. The same semantics as serving/batching/batch_scheduler.py, without the GIL.
#ifndef FGR_NATIVE_BATCHING_H_
#define FGR_NATIVE_BATCHING_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "live_counts.h"
#include "status.h"
#include "tensor.h"

namespace fgr {

using Clock = std::chrono::steady_clock;

struct BatchOptions {
  int64_t max_batch_size = 1000;
  int64_t batch_timeout_micros = 0;
  int64_t max_enqueued_batches = 10;
  std::vector<int64_t> allowed_batch_sizes;
  bool pad_variable_length_inputs = false;
  // Run each batch's ops in its batch thread (RunOptions.inter_op_thread_pool = -1) instead of on TF's
  // inter-op pool: the batch threads already keep the cores busy, and handing every op to the pool's
  // threads costs CPU the other batch thread would use (docs/performance.md, "Tuning").
  bool in_caller_thread = false;
};

// One call's share of a batch.
struct Task {
  using Done = std::function<void(const Status&, std::vector<TensorSlice>)>;

  int64_t rows = 0;
  int64_t elements = 0;
  int64_t bytes = 0;
  // With pad_variable_length_inputs, per feed: elements per row, and bytes each padding element takes.
  // A padded batch holds rows x its widest row of each feed, so that is what it is priced at.
  std::vector<int64_t> row_elements, pad_element_bytes;
  std::vector<TensorPtr> feeds;  // In the queue's feed order.
  int64_t timeout_ms = -1;       // < 0: none.
  Clock::time_point deadline = Clock::time_point::max();
  std::atomic<bool> abandoned{false};  // Its caller gave up: leave its rows out.
  Done done;
  Counted<Live::kTask> counted;

  // A batch thread takes the task out of its batch to run it: false if its caller abandoned it
  // first. The feeds and `done` of a taken task stay until it is finished, whatever its caller does.
  bool Take() {
    std::lock_guard<std::mutex> lock(take_mutex_);
    taken_ = true;
    return !abandoned.load();
  }

  // Once `abandoned` is set and its caller has answered: drops the feeds and `done` (and what `done`
  // holds: the request) now, unless a batch thread took the task already. A cancelled call queued in
  // a batch that waits long to fill (batch_timeout_micros) would otherwise hold its request until
  // the batch runs. The task itself (its rows in the batch's count) stays queued until then.
  void Drop() {
    Done dropped_done;  // Destroyed after the feeds: string feeds are views of the request it holds.
    std::vector<TensorPtr> dropped_feeds;
    {
      std::lock_guard<std::mutex> lock(take_mutex_);
      if (taken_) return;
      dropped_done.swap(done);
      dropped_feeds.swap(feeds);
    }
  }

 private:
  std::mutex take_mutex_;
  bool taken_ = false;
};

using TaskPtr = std::shared_ptr<Task>;

class BatchScheduler;

class BatchQueue {
 public:
  BatchQueue(BatchScheduler* scheduler, BatchOptions options, std::optional<int64_t> max_elements,
             std::optional<int64_t> max_bytes, std::function<void(std::vector<TaskPtr>)> process);

  // Enqueues the task, or returns why not (too large, queue full, scheduler stopped).
  Status Schedule(TaskPtr task);
  const BatchOptions& options() const { return options_; }

 private:
  friend class BatchScheduler;
  struct Batch {
    std::vector<TaskPtr> tasks;
    int64_t rows = 0, elements = 0, bytes = 0;  // Elements and bytes as padded (Task::row_elements).
    int64_t unpadded_bytes = 0;
    std::vector<int64_t> widest, unpadded;  // Per padded feed: its widest row, its elements before padding.
    Clock::time_point created = Clock::now();
    bool closed = false;
  };
  // What `batch` would hold with `task` added: (elements, bytes), padded.
  static std::pair<int64_t, int64_t> With(const Batch& batch, const Task& task);
  static void Add(Batch* batch, TaskPtr task);
  // When the head batch may run; nullopt if empty. Caller holds the scheduler's mutex.
  std::optional<Clock::time_point> ReadyAt() const;

  BatchScheduler* scheduler_;
  const BatchOptions options_;
  const std::optional<int64_t> max_elements_, max_bytes_;
  const std::function<void(std::vector<TaskPtr>)> process_;
  std::deque<Batch> batches_;  // Under the scheduler's mutex.
  bool removed_ = false;       // Under the scheduler's mutex.
};

class BatchScheduler {
 public:
  explicit BatchScheduler(int num_batch_threads);
  ~BatchScheduler();

  std::shared_ptr<BatchQueue> AddQueue(BatchOptions options, std::optional<int64_t> max_elements,
                                       std::optional<int64_t> max_bytes,
                                       std::function<void(std::vector<TaskPtr>)> process);
  // Forgets a queue once its servable is unloaded; batches still queued in it are processed first.
  void RemoveQueue(const std::shared_ptr<BatchQueue>& queue);
  // Runs every batch as soon as a thread is free, without waiting out batch_timeout_micros: from the
  // start of a shutdown, whose grace would otherwise run out on calls waiting for a batch to fill.
  void Drain();
  // Lets the threads finish queued batches, then joins them.
  void Stop();

 private:
  friend class BatchQueue;
  void Work();

  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopped_ = false;
  bool draining_ = false;
  std::list<std::shared_ptr<BatchQueue>> queues_;
  std::vector<std::thread> threads_;
};

// Finishes every task of a failed batch with `status`.
void FailAll(const std::vector<TaskPtr>& tasks, const Status& status);

}  // namespace fgr

#endif  // FGR_NATIVE_BATCHING_H_
