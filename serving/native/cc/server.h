// fgr-serve's public gRPC port, served by native threads.
//
// One async generic service takes every RPC, on a completion queue that the server's threads poll
// in turns (queue_workers.h): each RPC is read and decoded by the polling thread, with none of the
// hand-offs between gRPC's own threads that the callback API makes for every event. A Predict
// that the fast path can answer (a known model, version and signature; inputs carrying exactly
// their values) is decoded, batched, run and encoded here without the GIL. Everything else (other
// RPCs, and any Predict the fast path does not take: bad input, unknown models, fills, odd dtypes)
// goes, bytes unchanged, to the Python ServingApi, so that answers and errors are the Python
// path's own.
#ifndef FGR_NATIVE_SERVER_H_
#define FGR_NATIVE_SERVER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include "metrics.h"
#include "queue_workers.h"
#include "servable.h"
#include "thread_pool.h"

namespace fgr {

// --max_in_flight_requests, shared by both front ends.
class Admission {
 public:
  explicit Admission(int64_t limit) : limit_(limit) {}
  bool TryAcquire();
  void Release() { in_flight_.fetch_sub(1); }
  int64_t limit() const { return limit_; }

 private:
  const int64_t limit_;
  std::atomic<int64_t> in_flight_{0};
};

struct ServerOptions {
  int max_receive_message_length = -1;  // -1: no limit.
  std::vector<std::pair<std::string, std::variant<int, std::string>>> channel_args;
  bool tls = false;
  std::string key_pem, cert_pem, ca_pem;
  bool client_verify = false;
  bool enable_health = false;
  int64_t max_batch_size_per_request = 0;  // 0: no limit.
  bool method_name_check = false;
  bool as_tensor_content = false;
  int num_fallback_threads = 4;
  // Unbatched sessions run every op in the thread that read the request (TF's caller-thread mode,
  // RunOptions.inter_op_thread_pool = -1) rather than in TF's inter-op pool. TF then cannot cut a
  // run short at its deadline; the client still gets DEADLINE_EXCEEDED when it passes.
  bool unbatched_in_caller_thread = true;
};

struct FallbackResult {
  int code = 0;
  std::string message;
  std::string response;
};

// (full method path, request bytes, timeout in ms or -1) -> the Python path's answer.
using Fallback = std::function<FallbackResult(const std::string&, const std::string&, int64_t)>;

class Server {
 public:
  Server(ServerOptions options, Fallback fallback, std::shared_ptr<Metrics> metrics,
         std::shared_ptr<Admission> admission);
  ~Server();

  // Before Start: "host:port" (port 0: any) or "unix:path".
  void AddPort(const std::string& address);
  // Binds every port and starts serving; returns the bound ports in the order added. Throws
  // std::runtime_error if a port can't be bound, or if Shutdown came first.
  std::vector<int> Start();
  // A model's AVAILABLE versions and labels, replacing what was there; empty versions remove it.
  void SetModel(const std::string& name, std::map<int64_t, std::shared_ptr<Servable>> versions,
                std::map<std::string, int64_t> labels);
  void SetServing(bool serving);
  // Stops accepting RPCs and waits for in-flight ones, cancelling those left after the grace.
  void Shutdown(double grace_seconds);

  class Call;

 private:
  struct Model {
    std::map<int64_t, std::shared_ptr<Servable>> versions;
    std::map<std::string, int64_t> labels;
  };
  using Routes = std::map<std::string, Model>;

  // Shutdown, the caller holding shutdown_mutex_.
  void ShutdownLocked(double grace_seconds);
  // Shuts the completion queue down and joins its threads (after server_->Shutdown).
  void StopQueue();
  void Handle(Call* call);
  // The Predict fast path (predict.cc): answers the call and returns true, or returns false
  // holding nothing, for Fallback to answer.
  bool TryPredict(Call* call);
  void Fallback(Call* call);
  // The servable a ModelSpec names among the routes, or null (predict.cc).
  std::shared_ptr<Servable> Resolve(const void* model_spec);
  // Whether `model` has AVAILABLE versions in the routes (predict.cc).
  bool Routed(const std::string& model);
  // A call's request bytes, decompressed here within the message size limit (RESOURCE_EXHAUSTED
  // past it) when the client compressed them: gRPC 1.51 inflates a message whole before it checks
  // the limit, so a 1 MB gzip of zeros held a GiB, kept for good by --retain_freed_memory.
  grpc::Status RequestBytes(grpc::ByteBuffer* buffer, std::string* bytes) const;
  // The largest request accepted, in bytes (a channel argument's value wins); -1: no limit.
  int64_t max_receive_message_length_ = -1;

  const ServerOptions options_;
  const ::fgr::Fallback fallback_;
  const std::shared_ptr<Metrics> metrics_;
  const std::shared_ptr<Admission> admission_;
  std::vector<std::string> addresses_;
  std::vector<std::unique_ptr<int>> ports_;
  std::unique_ptr<grpc::AsyncGenericService> service_;
  std::unique_ptr<grpc::Server> server_;
  // One queue, polled by one thread at a time, which reads and decodes every request: Server::Call
  // relies on a call's events coming one at a time. Threads polling side by side measured no
  // better on 2 cores (docs/history/benchmarks-2026-11.md, "The native transport"). The same
  // threads run unbatched sessions, taking turns at the queue (queue_workers.h).
  std::unique_ptr<grpc::ServerCompletionQueue> queue_;
  std::unique_ptr<QueueWorkers> workers_;  // Null once the queue is stopped.
  // gRPC aborts the process on an op started on a shut-down queue. Calls are still answered after
  // the server's shutdown returns (a cancellation polled late, a batch or fallback thread finishing):
  // each op starts under this lock, shared, and only while `queue_open_`; StopQueue clears it,
  // exclusively, before it shuts the queue down.
  std::shared_mutex queue_ops_mutex_;
  bool queue_open_ = true;
  ThreadPool fallback_pool_;
  std::mutex routes_mutex_;
  std::shared_ptr<const Routes> routes_ = std::make_shared<Routes>();
  std::mutex shutdown_mutex_;
  bool shut_down_ = false;
};

}  // namespace fgr

#endif  // FGR_NATIVE_SERVER_H_
