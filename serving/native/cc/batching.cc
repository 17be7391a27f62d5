#include "batching.h"

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>

namespace fgr {

BatchQueue::BatchQueue(BatchScheduler* scheduler, BatchOptions options, std::optional<int64_t> max_elements,
                       std::optional<int64_t> max_bytes, std::function<void(std::vector<TaskPtr>)> process)
    : scheduler_(scheduler),
      options_(std::move(options)),
      max_elements_(max_elements),
      max_bytes_(max_bytes),
      process_(std::move(process)) {}

Status BatchQueue::Schedule(TaskPtr task) {
  if (task->rows > options_.max_batch_size) {
    return Status(kInvalidArgument, "Task size " + std::to_string(task->rows) +
                                        " is larger than maximum input batch size " +
                                        std::to_string(options_.max_batch_size));
  }
  const struct {
    int64_t amount;
    const std::optional<int64_t>& limit;
    const char* unit;
    const char* flag;
  } measures[] = {{task->elements, max_elements_, "elements", "--max_elements_per_batch"},
                  {task->bytes, max_bytes_, "bytes", "--max_bytes_per_batch"}};
  for (const auto& measure : measures) {
    if (measure.limit && measure.amount > *measure.limit) {
      return Status(kResourceExhausted,
                    "Task of " + std::to_string(measure.amount) + " " + measure.unit + " is larger than the maximum of " +
                        std::to_string(*measure.limit) + " " + measure.unit +
                        " per batch (derived from the inputs' shapes at max_batch_size rows unless set); raise " +
                        measure.flag + " to allow it");
    }
  }
  std::lock_guard<std::mutex> lock(scheduler_->mutex_);
  if (scheduler_->stopped_ || removed_) return Status(kUnavailable, "Batch scheduler is shutting down");
  Batch* last = batches_.empty() ? nullptr : &batches_.back();
  bool changed = false;  // Threads need waking only when a batch opens or closes.
  const auto [elements, bytes] = last == nullptr ? std::pair<int64_t, int64_t>() : With(*last, *task);
  if (last == nullptr || last->closed || last->rows + task->rows > options_.max_batch_size ||
      (max_elements_ && elements > *max_elements_) || (max_bytes_ && bytes > *max_bytes_)) {
    if (last != nullptr) last->closed = true;
    if (static_cast<int64_t>(batches_.size()) >= options_.max_enqueued_batches) {
      return Status(kUnavailable, "The batch scheduling queue to which this task was submitted is full");
    }
    batches_.emplace_back();
    last = &batches_.back();
    changed = true;
  }
  Add(last, std::move(task));
  if (last->rows >= options_.max_batch_size) {
    last->closed = true;
    changed = true;
  }
  if (changed) scheduler_->wake_.notify_one();
  return Status();
}

std::pair<int64_t, int64_t> BatchQueue::With(const Batch& batch, const Task& task) {
  if (task.row_elements.empty()) return {batch.elements + task.elements, batch.bytes + task.bytes};
  // Padded: each feed holds rows x its widest row, each padding element taking its bytes too.
  const int64_t rows = batch.rows + task.rows;
  int64_t elements = 0, bytes = batch.unpadded_bytes + task.bytes;
  for (size_t f = 0; f < task.row_elements.size(); ++f) {
    const bool seen = f < batch.widest.size();
    const int64_t padded = rows * std::max(seen ? batch.widest[f] : 0, task.row_elements[f]);
    const int64_t unpadded = (seen ? batch.unpadded[f] : 0) + task.rows * task.row_elements[f];
    elements += padded;
    bytes += (padded - unpadded) * task.pad_element_bytes[f];
  }
  return {elements, bytes};
}

void BatchQueue::Add(Batch* batch, TaskPtr task) {
  std::tie(batch->elements, batch->bytes) = With(*batch, *task);
  batch->unpadded_bytes += task->bytes;
  batch->widest.resize(task->row_elements.size(), 0);
  batch->unpadded.resize(task->row_elements.size(), 0);
  for (size_t f = 0; f < task->row_elements.size(); ++f) {
    batch->widest[f] = std::max(batch->widest[f], task->row_elements[f]);
    batch->unpadded[f] += task->rows * task->row_elements[f];
  }
  batch->rows += task->rows;
  batch->tasks.push_back(std::move(task));
}

std::optional<Clock::time_point> BatchQueue::ReadyAt() const {
  if (batches_.empty()) return std::nullopt;
  const Batch& head = batches_.front();
  if (head.closed) return head.created;
  // At most 10^15 us (about 31 years, "until full"), as the Python side caps it: any int64 is
  // accepted, but a larger one would overflow the clock's nanoseconds.
  constexpr int64_t kMaxTimeoutMicros = 1000000000000000;
  return head.created + std::chrono::microseconds(std::min(options_.batch_timeout_micros, kMaxTimeoutMicros));
}

BatchScheduler::BatchScheduler(int num_batch_threads) {
  for (int i = 0; i < std::max(1, num_batch_threads); ++i) threads_.emplace_back([this] { Work(); });
}

BatchScheduler::~BatchScheduler() { Stop(); }

std::shared_ptr<BatchQueue> BatchScheduler::AddQueue(BatchOptions options, std::optional<int64_t> max_elements,
                                                     std::optional<int64_t> max_bytes,
                                                     std::function<void(std::vector<TaskPtr>)> process) {
  auto queue = std::make_shared<BatchQueue>(this, std::move(options), max_elements, max_bytes, std::move(process));
  std::lock_guard<std::mutex> lock(mutex_);
  queues_.push_back(queue);
  return queue;
}

void BatchScheduler::RemoveQueue(const std::shared_ptr<BatchQueue>& queue) {
  std::unique_lock<std::mutex> lock(mutex_);
  // Queued batches still run (their callers wait for them): the threads drop the queue once empty.
  queue->removed_ = true;
  if (queue->batches_.empty()) queues_.remove(queue);
}

void BatchScheduler::Drain() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    draining_ = true;
  }
  wake_.notify_all();
}

void BatchScheduler::Stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopped_ && threads_.empty()) return;
    stopped_ = true;
  }
  wake_.notify_all();
  for (std::thread& thread : threads_) {
    if (thread.joinable()) thread.join();
  }
  threads_.clear();
}

void BatchScheduler::Work() {
  while (true) {
    std::shared_ptr<BatchQueue> queue;
    std::vector<TaskPtr> tasks;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      while (true) {
        const Clock::time_point now = Clock::now();
        std::shared_ptr<BatchQueue> best;
        Clock::time_point best_at, next_wake = Clock::time_point::max();
        for (auto it = queues_.begin(); it != queues_.end();) {
          std::optional<Clock::time_point> ready = (*it)->ReadyAt();
          if (!ready) {
            if ((*it)->removed_) {  // Removed and drained.
              it = queues_.erase(it);
              continue;
            }
          } else if (*ready <= now || stopped_ || draining_ || (*it)->removed_) {
            if (!best || *ready < best_at) {
              best = *it;
              best_at = *ready;
            }
          } else if (*ready < next_wake) {
            next_wake = *ready;
          }
          ++it;
        }
        if (best) {
          queue = best;
          BatchQueue::Batch batch = std::move(queue->batches_.front());
          queue->batches_.pop_front();
          tasks = std::move(batch.tasks);
          break;
        }
        if (stopped_) return;
        if (next_wake == Clock::time_point::max()) {
          wake_.wait(lock);
        } else {
          wake_.wait_until(lock, next_wake);
        }
      }
    }
    queue->process_(std::move(tasks));
  }
}

std::atomic<int64_t>& LiveCount(Live kind) {
  static std::atomic<int64_t> counts[static_cast<int>(Live::kCount)];
  return counts[static_cast<int>(kind)];
}

void FailAll(const std::vector<TaskPtr>& tasks, const Status& status) {
  for (const TaskPtr& task : tasks) task->done(status, {});
}

}  // namespace fgr
