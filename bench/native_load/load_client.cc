// A gRPC load generator whose own cost stays out of the way of the server it measures.
//
// The Python driver (clients/loadtest) spends a few hundred microseconds of CPU per request, which on
// a 2-core machine caps what it can show of a native server. This sends the same requests through
// gRPC's generic stub and one completion queue: closed loop (N calls always outstanding, from the
// completion thread) or open loop (a sender thread starts calls at fixed intervals, latency counted
// from the intended send time, so a stalled server is not hidden). It writes every latency in
// microseconds (little-endian int64) and a one-line summary (with the open loop's send lag);
// bench/serving_native.py summarises them with HdrHistogram.
//
//   fgr_load_client --target=127.0.0.1:8500 --requests=reqs.bin --streams=32 --seconds=5 \
//       --warmup_seconds=1 --latencies=out.bin
//
// reqs.bin: serialized PredictRequests, each preceded by its length as a little-endian uint32.
#include <grpcpp/alarm.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <sys/prctl.h>

namespace {

using Clock = std::chrono::steady_clock;

std::map<std::string, std::string> ParseFlags(int argc, char** argv) {
  std::map<std::string, std::string> flags;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) continue;
    const size_t eq = arg.find('=');
    flags[arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2)] =
        eq == std::string::npos ? "1" : arg.substr(eq + 1);
  }
  return flags;
}

std::vector<grpc::ByteBuffer> ReadRequests(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<grpc::ByteBuffer> requests;
  uint32_t size;
  while (in.read(reinterpret_cast<char*>(&size), sizeof(size))) {
    std::string bytes(size, '\0');
    if (!in.read(bytes.data(), size)) break;
    grpc::Slice slice(bytes);
    requests.emplace_back(&slice, 1);
  }
  return requests;
}

struct Call {
  grpc::ClientContext context;
  grpc::ByteBuffer response;
  grpc::Status status;
  Clock::time_point intended;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;
};

}  // namespace

int main(int argc, char** argv) {
  auto flags = ParseFlags(argc, argv);
  const std::string target = flags["target"];
  const std::string method = flags.count("method") ? flags["method"] : "/tensorflow.serving.PredictionService/Predict";
  const int streams = flags.count("streams") ? std::atoi(flags["streams"].c_str()) : 0;
  const double qps = flags.count("qps") ? std::atof(flags["qps"].c_str()) : 0;
  const double seconds = flags.count("seconds") ? std::atof(flags["seconds"].c_str()) : 5;
  const double warmup = flags.count("warmup_seconds") ? std::atof(flags["warmup_seconds"].c_str()) : 1;
  const double timeout = flags.count("timeout_seconds") ? std::atof(flags["timeout_seconds"].c_str()) : 10;
  const std::vector<grpc::ByteBuffer> requests = ReadRequests(flags["requests"]);
  if (target.empty() || requests.empty() || (streams <= 0) == (qps <= 0)) {
    std::cerr << "usage: fgr_load_client --target=host:port --requests=FILE (--streams=N | --qps=R) "
                 "[--seconds=S --warmup_seconds=W --latencies=FILE --method=/pkg.Service/Method]\n";
    return 2;
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue queue;
  const Clock::time_point start = Clock::now();
  const Clock::time_point measure_from = start + std::chrono::duration_cast<Clock::duration>(
                                                     std::chrono::duration<double>(warmup));
  const Clock::time_point end =
      measure_from + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  std::vector<int64_t> latencies;
  latencies.reserve(1 << 20);
  int64_t errors = 0;
  std::atomic<int64_t> sent{0}, outstanding{0};  // Open loop: changed by both threads.
  std::map<int, int64_t> error_codes;
  std::vector<int64_t> send_lags;  // Open loop, measured sends: how late each left (us), by the sender.
  auto issue = [&](Clock::time_point intended) {
    auto* call = new Call;
    call->intended = intended;
    call->context.set_deadline(std::chrono::system_clock::now() +
                               std::chrono::duration_cast<std::chrono::system_clock::duration>(
                                   std::chrono::duration<double>(timeout)));
    ++outstanding;  // Before the call can complete.
    call->reader = stub.PrepareUnaryCall(&call->context, method, requests[sent++ % requests.size()], &queue);
    call->reader->StartCall();
    call->reader->Finish(&call->response, &call->status, call);
  };
  auto complete = [&](Call* call) {
    const Clock::time_point now = Clock::now();
    --outstanding;
    if (call->intended >= measure_from && now <= end) {
      if (call->status.ok()) {
        latencies.push_back(std::chrono::duration_cast<std::chrono::microseconds>(now - call->intended).count());
      } else {
        ++errors;
        ++error_codes[call->status.error_code()];
      }
    }
    delete call;
  };
  if (streams > 0) {
    for (int i = 0; i < streams; ++i) issue(Clock::now());
    void* tag;
    bool ok;
    while (outstanding > 0 && queue.Next(&tag, &ok)) {
      complete(static_cast<Call*>(tag));
      if (Clock::now() < end) issue(Clock::now());
    }
  } else {
    // Sends keep to their schedule only from a thread of their own that sleeps until each one. A
    // single thread waiting in AsyncNext until the next send woke up at the millisecond granularity
    // of gRPC's poller: sends went out 0.7-1.3 ms late at p50, and all of it counted as latency.
    // Waking from a sleep took ~0.1 ms on a VM, so the last stretch before a send is spun: at most
    // 0.2 ms, and a tenth of the interval at high rates, to keep the sender's CPU small.
    const auto interval = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / qps));
    const auto spin = std::min<Clock::duration>(std::chrono::microseconds(200), interval / 10);
    grpc::Alarm sender_done;
    std::thread sender([&] {
      prctl(PR_SET_TIMERSLACK, 1UL);  // Wake on time, not up to 50 us later (Linux's default slack).
      for (Clock::time_point next = start; next < end; next += interval) {
        std::this_thread::sleep_until(next - spin);
        while (Clock::now() < next) {
        }
        if (next >= measure_from) {
          send_lags.push_back(std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - next).count());
        }
        issue(next);
      }
      sender_done.Set(&queue, std::chrono::system_clock::now(), &sender_done);
    });
    void* tag;
    bool ok;
    bool sending = true;
    while ((sending || outstanding > 0) && queue.Next(&tag, &ok)) {
      if (tag == &sender_done) {
        sending = false;
      } else {
        complete(static_cast<Call*>(tag));
      }
    }
    sender.join();
  }
  queue.Shutdown();
  void* drained;
  bool drained_ok;
  while (queue.Next(&drained, &drained_ok)) {
  }
  if (flags.count("latencies")) {
    std::ofstream out(flags["latencies"], std::ios::binary);
    out.write(reinterpret_cast<const char*>(latencies.data()), latencies.size() * sizeof(int64_t));
  }
  std::printf("{\"ok\": %zu, \"errors\": %lld, \"seconds\": %.3f", latencies.size(), static_cast<long long>(errors),
              seconds);
  for (const auto& [code, count] : error_codes) std::printf(", \"code_%d\": %lld", code, static_cast<long long>(count));
  if (!send_lags.empty()) {  // Counted in every latency: a late sender shows here, not as the server's.
    std::sort(send_lags.begin(), send_lags.end());
    std::printf(", \"send_lag_p50_us\": %lld, \"send_lag_p99_us\": %lld",
                static_cast<long long>(send_lags[send_lags.size() / 2]),
                static_cast<long long>(send_lags[send_lags.size() * 99 / 100]));
  }
  std::printf("}\n");
  return 0;
}
