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
#include <string>
#include <vector>

#include <grpcpp/generic/async_generic_service.h>

#include "server.h"

namespace fgr {

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

  // The request's bytes, in one string.
  static std::string ToString(const grpc::ByteBuffer& buffer) {
    std::vector<grpc::Slice> slices;
    std::string bytes;
    if (!buffer.Dump(&slices).ok()) return bytes;
    bytes.reserve(buffer.Length());
    for (const grpc::Slice& slice : slices) bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    return bytes;
  }
};

}  // namespace fgr

#endif  // FGR_NATIVE_CALL_H_
