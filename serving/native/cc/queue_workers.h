// Threads that take turns polling one gRPC completion queue: the leader/follower pattern.
//
// One thread at a time, the leader, takes events off the queue and handles them, so a call's
// events still come one at a time. An event that starts blocking work (an unbatched session run)
// leaves it with `RunAfterEvent`; once the event is handled, the leader hands the queue to an
// idle thread and runs the work itself. The request thus goes on without waiting for another
// thread to wake up, which a hand-off to a pool costs on every request, and the queue is never
// left unpolled. When no thread is idle, the work waits for the first one
// to free up, while the leader keeps polling.
//
// Written here because gRPC's async API leaves threading to its user, and a pool (thread_pool.h)
// puts a thread wake between every event and its work.
#ifndef FGR_NATIVE_QUEUE_WORKERS_H_
#define FGR_NATIVE_QUEUE_WORKERS_H_

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <grpcpp/completion_queue.h>

namespace fgr {

class QueueWorkers {
 public:
  // Handles one event: (the queue's tag, the queue's verdict on it).
  using Handler = std::function<void(void*, bool)>;

  // `threads` threads (at least two) serve `queue`: one polls, the others run work.
  QueueWorkers(grpc::CompletionQueue* queue, int threads, Handler handler)
      : queue_(queue), num_threads_(std::max(2, threads)), handler_(std::move(handler)) {}

  // Starts the threads; call once at most.
  void Start() {
    for (int i = 0; i < num_threads_; ++i) threads_.emplace_back([this] { Loop(); });
  }

  // From the handler only: runs `work` once the event being handled is over.
  void RunAfterEvent(std::function<void()> work) { after_event_ = std::move(work); }

  // After the queue is shut down: returns once it is drained and every work has run. Without
  // Start (a failed start-up), drains it on this thread, as a queue must be before it is destroyed.
  void Join() {
    if (threads_.empty()) {
      void* tag;
      bool ok;
      while (queue_->Next(&tag, &ok)) {
        handler_(tag, ok);
        if (after_event_) std::exchange(after_event_, nullptr)();
      }
      return;
    }
    for (std::thread& thread : threads_) thread.join();
    threads_.clear();
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      if (!waiting_.empty()) {
        std::function<void()> work = std::move(waiting_.front());
        waiting_.pop_front();
        lock.unlock();
        work();
        lock.lock();
      } else if (!led_ && !drained_) {
        led_ = true;
        lock.unlock();
        std::function<void()> work = Lead();  // Leaves led_ false: another thread may lead already.
        if (work) work();
        lock.lock();
      } else if (drained_) {
        return;
      } else {
        ++idle_;
        wake_.wait(lock, [this] { return !waiting_.empty() || !led_ || drained_; });
        --idle_;
      }
    }
  }

  // Polls until an event leaves work and a thread is idle to take over the queue: returns that
  // work, to run after the hand-over; or until the queue is drained: returns nothing.
  std::function<void()> Lead() {
    void* tag;
    bool ok;
    while (queue_->Next(&tag, &ok)) {
      handler_(tag, ok);
      if (!after_event_) continue;
      std::function<void()> work = std::exchange(after_event_, nullptr);
      std::lock_guard<std::mutex> lock(mutex_);
      if (idle_ > 0) {
        led_ = false;
        wake_.notify_one();
        return work;
      }
      waiting_.push_back(std::move(work));  // Every other thread is busy: the first to finish runs it.
    }
    std::lock_guard<std::mutex> lock(mutex_);
    led_ = false;
    drained_ = true;
    wake_.notify_all();
    return nullptr;
  }

  grpc::CompletionQueue* const queue_;
  const int num_threads_;
  const Handler handler_;
  std::function<void()> after_event_;  // Only the thread handling an event touches it.
  std::mutex mutex_;
  std::condition_variable wake_;
  bool led_ = false;      // A thread is polling the queue.
  bool drained_ = false;  // The queue is shut down and empty.
  int idle_ = 0;          // Threads waiting in Loop.
  std::deque<std::function<void()>> waiting_;  // Work that found no idle thread to lead.
  std::vector<std::thread> threads_;
};

}  // namespace fgr

#endif  // FGR_NATIVE_QUEUE_WORKERS_H_
