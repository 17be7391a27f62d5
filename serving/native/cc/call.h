// One RPC on the native gRPC port (server.h's `Server::Call`): read once, answered once.
//
// Shared by the server (routes, fallback) and the Predict fast path (predict.cc), which answer
// calls through it.
#ifndef FGR_NATIVE_CALL_H_
#define FGR_NATIVE_CALL_H_

#include <algorithm>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include <grpcpp/generic/async_generic_service.h>

#include "server.h"

namespace fgr {

// `text` with each byte that is not part of a well-formed UTF-8 sequence written as "\xNN", as
// Python's "backslashreplace" decodes it (module.cc's NativeError, so the Python path's messages).
inline std::string ValidUtf8(const std::string& text) {
  auto at = [&](size_t i) { return i < text.size() ? static_cast<unsigned char>(text[i]) : 0; };
  auto in = [](unsigned char c, unsigned char low, unsigned char high) { return c >= low && c <= high; };
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const unsigned char c = at(i);
    size_t n = 0;  // The length of the well-formed sequence at i (the Unicode standard's table 3-7), or 0.
    if (c < 0x80) {
      n = 1;
    } else if (in(c, 0xC2, 0xDF)) {
      n = in(at(i + 1), 0x80, 0xBF) ? 2 : 0;
    } else if (in(c, 0xE0, 0xEF)) {
      const unsigned char low = c == 0xE0 ? 0xA0 : 0x80, high = c == 0xED ? 0x9F : 0xBF;
      n = in(at(i + 1), low, high) && in(at(i + 2), 0x80, 0xBF) ? 3 : 0;
    } else if (in(c, 0xF0, 0xF4)) {
      const unsigned char low = c == 0xF0 ? 0x90 : 0x80, high = c == 0xF4 ? 0x8F : 0xBF;
      n = in(at(i + 1), low, high) && in(at(i + 2), 0x80, 0xBF) && in(at(i + 3), 0x80, 0xBF) ? 4 : 0;
    }
    if (n == 0) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += {'\\', 'x', kHex[c >> 4], kHex[c & 0xF]};
      ++i;
      continue;
    }
    out.append(text, i, n);
    i += n;
  }
  return out;
}

// One RPC of the async generic service: it asks gRPC for the next call on a completion queue,
// reads its single request, then is answered once, from whichever thread finishes it.
//
// The thread polling the server's queue (one at a time, queue_workers.h) hands each event to
// `Proceed`. gRPC returns four tags: the call's arrival, its read, its finish, and "done" (the call
// is over, or was cancelled). The object is deleted once the call has arrived, done has come back
// and no read or finish is still out. With one poller at a time, a call's events are handled one
// at a time: done never runs beside the arrival or the read (only Answer comes from other threads,
// and it takes the state's lock).
//
// A cancelled call (the client went away, or its deadline passed, or shutdown's grace ran out) is
// finished at once, so that shutdown never waits for work it no longer needs: a batch that waits
// out a long timeout, or a Python fallback. The work still finishes later; it then finds the call
// answered and leaves it.
class Server::Call {
 public:
  // Shared with the work done for the call, which may outlive it.
  struct State {
    std::mutex mutex;
    Call* call = nullptr;            // Null once the call is deleted.
    bool answered = false;           // Finish has been called (or the call is gone).
    TaskPtr task;                    // Its queued batch task, if any.
    std::function<void()> release;   // Returns what the request holds (servable, admission).
    // Counts the call in request_count, once: set when the fast path takes the call (Python counts
    // the calls it answers), run by its answer or by its cancellation, whichever comes first.
    std::function<void(const std::string& code)> record;
    // The client's deadline (system_clock::time_point::max() for none).
    std::chrono::system_clock::time_point deadline = std::chrono::system_clock::time_point::max();
    Counted<Live::kCall> counted;

    // Runs `record` once, whoever calls first.
    void Record(const std::string& code) {
      std::function<void(const std::string&)> run;
      {
        std::lock_guard<std::mutex> lock(mutex);
        run.swap(record);
      }
      if (run) run(code);
    }

    // Whether the deadline is less than `slack` away (or past).
    bool PastDeadline(std::chrono::milliseconds slack = std::chrono::milliseconds(0)) const {
      return deadline != std::chrono::system_clock::time_point::max() &&
             std::chrono::system_clock::now() + slack >= deadline;
    }

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

  // What a completion-queue event is about; the queue's tag is a pointer to one of the call's Tags.
  enum class Event { kArrived, kRead, kFinished, kDone };
  struct Tag {
    Call* call;
    Event event;
  };

  // Asks gRPC for the next call on `queue` (one Call object waits for each).
  static void Await(Server* server, grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* queue) {
    Call* call = new Call(server, service, queue);
    // Before the request: gRPC only takes a done tag on a call that has not started.
    call->context_.AsyncNotifyWhenDone(&call->done_tag_);
    service->RequestCall(&call->context_, &call->stream_, queue, queue, &call->arrived_tag_);
  }

  // One event off the completion queue: `ok` is the queue's verdict on it.
  static void Proceed(void* tag, bool ok) {
    const Tag* event = static_cast<Tag*>(tag);
    event->call->OnEvent(event->event, ok);
  }

  // The most bytes of a status message sent in trailers, as serving/errors.py's MAX_STATUS_MESSAGE:
  // messages echo what the client sent, and trailers over gRPC's limit would reach the client as
  // RESOURCE_EXHAUSTED instead of the error's own code.
  static constexpr size_t kMaxStatusMessage = 2048;

  // Valid UTF-8 too: gRPC sends a status message as UTF-8, and TF's errors echo the client's bytes.
  static grpc::Status Capped(const grpc::Status& status) {
    const std::string message = ValidUtf8(status.error_message());
    if (message.size() <= kMaxStatusMessage) return grpc::Status(status.error_code(), message);
    size_t end = kMaxStatusMessage;
    while (end > 0 && (static_cast<unsigned char>(message[end]) & 0xC0) == 0x80) --end;  // Whole UTF-8 chars.
    return grpc::Status(status.error_code(), message.substr(0, end) + "... (" +
                                                 std::to_string(message.size() - end) + " more bytes)");
  }

  // Answers the call unless it was answered already; the call may be gone once this returns.
  static void Answer(const std::shared_ptr<State>& state, const grpc::Status& status, const std::string& response) {
    Call* call;
    std::shared_lock<std::shared_mutex> open;  // Held until the finish has started.
    {
      std::lock_guard<std::mutex> lock(state->mutex);
      if (state->answered) return;
      state->answered = true;
      call = state->call;
      // A queued task's `done` holds this state: drop the state's hold on the task, or the two would
      // keep each other (and the request, its tensors and outputs) alive forever.
      state->task.reset();
      if (call == nullptr) return;
      open = std::shared_lock<std::shared_mutex>(call->server_->queue_ops_mutex_);
      // The queue is shut down, so the server was: the call was cancelled, and its done tag, still
      // to come back, deletes it.
      if (!call->server_->queue_open_) return;
      ++call->out_;  // The finish below: the call is not deleted before its tag is back.
    }
    if (!status.ok()) {
      call->stream_.Finish(Capped(status), &call->finished_tag_);
      return;
    }
    grpc::Slice slice(response);
    call->response_ = grpc::ByteBuffer(&slice, 1);
    call->stream_.WriteAndFinish(call->response_, grpc::WriteOptions(), grpc::Status::OK, &call->finished_tag_);
  }

  // A cancellation this close to the deadline is the deadline's: the client cancels at its own
  // deadline, which comes a little before the server's (set when the call's headers were read,
  // later than the client sent them).
  static constexpr std::chrono::milliseconds kDeadlineSlack{100};

  // Milliseconds until the client's deadline (its batch task's), or -1 for none.
  int64_t TimeoutMs() const {
    const auto deadline = context_.deadline();
    if (deadline == std::chrono::system_clock::time_point::max()) return -1;
    const auto remaining = deadline - std::chrono::system_clock::now();
    if (remaining > std::chrono::hours(24 * 365 * 3)) return -1;  // ~1e8 s: no deadline.
    return std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::milliseconds>(remaining).count());
  }

  const std::string& method() const { return context_.method(); }
  const std::string& bytes() const { return bytes_; }
  Clock::time_point started() const { return started_; }
  const std::shared_ptr<State>& state() const { return state_; }

 private:
  Call(Server* server, grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* queue)
      : server_(server), service_(service), queue_(queue), stream_(&context_) {}

  void OnEvent(Event event, bool ok) {
    switch (event) {
      case Event::kArrived:
        if (!ok) {  // Shutdown: no call came, and none will (its done tag never comes back either).
          Delete();
          return;
        }
        started_ = Clock::now();
        // From here on it is a live call (the object that waited for it was not one).
        state_ = std::make_shared<State>();
        state_->call = this;
        state_->deadline = context_.deadline();
        {
          std::shared_lock<std::shared_mutex> open(server_->queue_ops_mutex_);
          std::lock_guard<std::mutex> lock(state_->mutex);
          if (!server_->queue_open_) {  // Polled after the shutdown (as Answer): only done comes back.
            state_->answered = true;
            out_ += 1;
            return;
          }
          Await(server_, service_, queue_);  // The next call, before this one's work.
          out_ += 2;  // The read below, and done.
          stream_.Read(&request_, &read_tag_);
        }
        return;
      case Event::kRead:
        if (!ok) {
          Answer(state_, grpc::Status(grpc::StatusCode::INTERNAL, "No request message"), "");
        } else {
          const grpc::Status read = server_->RequestBytes(&request_, &bytes_);
          request_.Clear();
          if (read.ok()) {
            server_->Handle(this);
          } else {
            Answer(state_, read, "");
          }
        }
        Returned();
        return;
      case Event::kFinished:
        Returned();
        return;
      case Event::kDone:
        if (context_.IsCancelled()) OnCancel();
        Returned();
        return;
    }
  }

  void OnCancel() {
    TaskPtr task;
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      task = state_->task;
      if (task) task->abandoned = true;
    }
    // Counted as the client saw it, as TF Serving counts the run its deadline cut short.
    state_->Record(state_->PastDeadline(kDeadlineSlack) ? "DEADLINE_EXCEEDED" : "CANCELLED");
    Answer(state_, grpc::Status(grpc::StatusCode::CANCELLED, "Cancelled"), "");
    state_->Release();
    // Answered and released: a task still queued frees its request now, not when its batch runs.
    if (task) task->Drop();
  }

  // One of the tags counted in `out_` came back; the last one deletes the call.
  void Returned() {
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      if (--out_ > 0) return;
    }
    Delete();
  }

  void Delete() {
    if (state_) {
      std::lock_guard<std::mutex> lock(state_->mutex);
      state_->call = nullptr;
      state_->answered = true;
    }
    delete this;
  }

  Server* const server_;
  grpc::AsyncGenericService* const service_;
  grpc::ServerCompletionQueue* const queue_;
  grpc::GenericServerContext context_;
  grpc::GenericServerAsyncReaderWriter stream_;
  Clock::time_point started_;
  std::shared_ptr<State> state_;  // Made when the call arrives.
  grpc::ByteBuffer request_, response_;
  std::string bytes_;
  int out_ = 0;  // Tags gRPC has yet to return (read, finish, done), under state_->mutex.
  Tag arrived_tag_{this, Event::kArrived}, read_tag_{this, Event::kRead}, finished_tag_{this, Event::kFinished},
      done_tag_{this, Event::kDone};
};

}  // namespace fgr

#endif  // FGR_NATIVE_CALL_H_
