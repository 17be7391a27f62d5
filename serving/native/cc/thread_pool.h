// A fixed pool of threads running posted closures in order; Stop() drains, then joins.
//
// Written here because gRPC hands out no executor of its own for blocking work, and the Python
// fallbacks, which wait for the GIL, must not occupy the threads that take turns at the server's
// completion queue (queue_workers.h).
#ifndef FGR_NATIVE_THREAD_POOL_H_
#define FGR_NATIVE_THREAD_POOL_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace fgr {

class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    for (int i = 0; i < std::max(1, threads); ++i) {
      threads_.emplace_back([this] {
        while (true) {
          std::function<void()> work;
          {
            std::unique_lock<std::mutex> lock(mutex_);
            ready_.wait(lock, [this] { return stopped_ || !queue_.empty(); });
            if (queue_.empty()) return;
            work = std::move(queue_.front());
            queue_.pop_front();
          }
          work();
        }
      });
    }
  }
  ~ThreadPool() { Stop(); }

  void Post(std::function<void()> work) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(work));
    }
    ready_.notify_one();
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopped_ = true;
    }
    ready_.notify_all();
    for (std::thread& thread : threads_) {
      if (thread.joinable()) thread.join();
    }
    threads_.clear();
  }

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> queue_;
  bool stopped_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace fgr

#endif  // FGR_NATIVE_THREAD_POOL_H_
