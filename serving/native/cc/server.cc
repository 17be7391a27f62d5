#include "server.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <vector>

#include <google/protobuf/stubs/logging.h>
#include <grpc/byte_buffer.h>
#include <grpc/compression.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <zlib.h>

#include "call.h"

namespace grpc::internal {
// A friend of grpc::ByteBuffer that gRPC declares and defines only in its tests: the way to a
// received message's core buffer, whose bytes are still compressed (RequestBytes).
class GrpcByteBufferPeer {
 public:
  explicit GrpcByteBufferPeer(ByteBuffer* buffer) : buffer_(buffer) {}
  grpc_byte_buffer* c_buffer() { return buffer_->c_buffer(); }

 private:
  ByteBuffer* buffer_;
};
}  // namespace grpc::internal

namespace fgr {
namespace {

constexpr char kPredictMethod[] = "/tensorflow.serving.PredictionService/Predict";
const char* const kHealthServices[] = {"", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"};

// libprotobuf logs an ERROR line for each string field of bad UTF-8 it parses. The fast path hands
// such a request to Python, which answers INVALID_ARGUMENT and logs nothing; the line would be one a
// client writes to the server's log at will. Those lines are dropped; the rest print as libprotobuf's
// default handler prints them.
void ProtobufLog(google::protobuf::LogLevel level, const char* filename, int line, const std::string& message) {
  if (message.find("contains invalid UTF-8 data") != std::string::npos) return;
  static const char* const kLevels[] = {"INFO", "WARNING", "ERROR", "FATAL"};
  std::fprintf(stderr, "[libprotobuf %s %s:%d] %s\n", kLevels[std::clamp(static_cast<int>(level), 0, 3)], filename,
               line, message.c_str());
  std::fflush(stderr);
}

// Inflates a gzip or deflate message (gRPC's zlib settings, message_compress.cc) into `out`,
// stopping as soon as it would pass `limit` bytes (-1: none). It inflates into 64 KiB pieces and
// joins them once at the end: a string grown as it goes would copy itself at every doubling, and a
// refused message would leave twice the limit touched (and kept, as freed memory is).
grpc::Status Inflate(const grpc_slice_buffer& compressed, bool gzip, int64_t limit, std::string* out) {
  z_stream stream{};
  if (inflateInit2(&stream, 15 | (gzip ? 16 : 0)) != Z_OK) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "Failed to start decompressing the request");
  }
  constexpr size_t kPiece = 1 << 16;
  std::vector<std::unique_ptr<char[]>> pieces;
  size_t total = 0, last = 0;  // Bytes inflated; those in the last piece.
  int result = Z_OK;
  for (size_t i = 0; i < compressed.count && result != Z_STREAM_END; ++i) {
    stream.next_in = GRPC_SLICE_START_PTR(compressed.slices[i]);
    stream.avail_in = static_cast<uInt>(GRPC_SLICE_LENGTH(compressed.slices[i]));
    do {
      if (pieces.empty() || last == kPiece) {
        pieces.push_back(std::make_unique<char[]>(kPiece));
        last = 0;
      }
      stream.next_out = reinterpret_cast<Bytef*>(pieces.back().get() + last);
      stream.avail_out = static_cast<uInt>(kPiece - last);
      result = inflate(&stream, Z_NO_FLUSH);
      const size_t produced = kPiece - last - stream.avail_out;
      last += produced;
      total += produced;
      if (limit >= 0 && total > static_cast<uint64_t>(limit)) {
        inflateEnd(&stream);
        return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                            "Decompressed message larger than max (" + std::to_string(limit) + " bytes)");
      }
    } while (result == Z_OK && (stream.avail_in > 0 || stream.avail_out == 0));
    if (result != Z_OK && result != Z_STREAM_END && !(result == Z_BUF_ERROR && stream.avail_in == 0)) break;
  }
  inflateEnd(&stream);
  if (result != Z_STREAM_END) {
    // gRPC's own words and code for a message that does not inflate (message_decompress_filter.cc).
    return grpc::Status(grpc::StatusCode::INTERNAL, std::string("Unexpected error decompressing data for algorithm ") +
                                                        (gzip ? "gzip" : "deflate"));
  }
  out->reserve(total);
  for (size_t i = 0; i < pieces.size(); ++i) out->append(pieces[i].get(), i + 1 < pieces.size() ? kPiece : last);
  return grpc::Status::OK;
}

}  // namespace

grpc::Status Server::RequestBytes(grpc::ByteBuffer* buffer, std::string* bytes) const {
  grpc_byte_buffer* raw = grpc::internal::GrpcByteBufferPeer(buffer).c_buffer();
  if (raw != nullptr && raw->type == GRPC_BB_RAW &&
      (raw->data.raw.compression == GRPC_COMPRESS_GZIP || raw->data.raw.compression == GRPC_COMPRESS_DEFLATE)) {
    return Inflate(raw->data.raw.slice_buffer, raw->data.raw.compression == GRPC_COMPRESS_GZIP,
                   max_receive_message_length_, bytes);
  }
  std::vector<grpc::Slice> slices;
  if (!buffer->Dump(&slices).ok()) return grpc::Status::OK;  // No message: an empty request, as before.
  bytes->reserve(buffer->Length());
  for (const grpc::Slice& slice : slices) bytes->append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return grpc::Status::OK;
}

bool Admission::TryAcquire() {
  if (in_flight_.fetch_add(1) >= limit_) {
    in_flight_.fetch_sub(1);
    return false;
  }
  return true;
}

Server::Server(ServerOptions options, ::fgr::Fallback fallback, std::shared_ptr<Metrics> metrics,
               std::shared_ptr<Admission> admission)
    : options_(std::move(options)),
      fallback_(std::move(fallback)),
      metrics_(std::move(metrics)),
      admission_(std::move(admission)),
      fallback_pool_(options_.num_fallback_threads) {
  static std::once_flag quiet;
  std::call_once(quiet, [] { google::protobuf::SetLogHandler(&ProtobufLog); });
}

Server::~Server() { Shutdown(0); }

void Server::AddPort(const std::string& address) { addresses_.push_back(address); }

std::vector<int> Server::Start() {
  // Exclusive with Shutdown: a start after (or racing) a shutdown would serve on, with threads that
  // nothing stops, and the process would abort when the server is destroyed.
  std::lock_guard<std::mutex> lock(shutdown_mutex_);
  if (shut_down_) throw std::runtime_error("The gRPC server was shut down before it started");
  grpc::EnableDefaultHealthCheckService(options_.enable_health);
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> tls;
  if (options_.tls) {
    grpc::SslServerCredentialsOptions ssl(options_.client_verify
                                              ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                              : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    ssl.pem_root_certs = options_.ca_pem;
    ssl.pem_key_cert_pairs.push_back({options_.key_pem, options_.cert_pem});
    tls = grpc::SslServerCredentials(ssl);
  }
  for (const std::string& address : addresses_) {
    // UNIX sockets stay plaintext: local, guarded by file permissions (as the Python path).
    const bool unix_socket = address.rfind("unix:", 0) == 0;
    ports_.push_back(std::make_unique<int>(0));
    builder.AddListeningPort(address, tls && !unix_socket ? tls : grpc::InsecureServerCredentials(),
                             ports_.back().get());
  }
  builder.SetMaxReceiveMessageSize(options_.max_receive_message_length);
  builder.SetMaxSendMessageSize(-1);
  // Debian's gRPC 1.51 accepts 8 KiB of request metadata, the Python path's grpcio 16 KiB: clients
  // (large auth tokens) meet one limit whichever path serves them. --grpc_channel_arguments still wins.
  builder.AddChannelArgument(GRPC_ARG_MAX_METADATA_SIZE, 16 * 1024);
  // Compressed requests reach RequestBytes as they came, to be inflated there within the limit.
  builder.AddChannelArgument(GRPC_ARG_ENABLE_PER_MESSAGE_DECOMPRESSION, 0);
  max_receive_message_length_ = options_.max_receive_message_length;
  for (const auto& [name, value] : options_.channel_args) {
    if (std::holds_alternative<int>(value)) {
      if (name == GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH) max_receive_message_length_ = std::get<int>(value);
      builder.AddChannelArgument(name, std::get<int>(value));
    } else {
      builder.AddChannelArgument(name, std::get<std::string>(value));
    }
  }
  service_ = std::make_unique<grpc::AsyncGenericService>();
  builder.RegisterAsyncGenericService(service_.get());
  queue_ = builder.AddCompletionQueue();
  // One thread polls; as many as the fallbacks' run unbatched sessions.
  workers_ = std::make_unique<QueueWorkers>(queue_.get(), 1 + options_.num_fallback_threads, &Call::Proceed);
  server_ = builder.BuildAndStart();
  if (!server_) {
    StopQueue();
    std::string joined;
    for (const std::string& address : addresses_) joined += (joined.empty() ? "" : ", ") + address;
    throw std::runtime_error("Failed to bind gRPC server to " + joined);
  }
  std::vector<int> ports;
  for (size_t i = 0; i < addresses_.size(); ++i) {
    const bool unix_socket = addresses_[i].rfind("unix:", 0) == 0;
    if (*ports_[i] == 0 && !unix_socket) {
      ShutdownLocked(0);
      throw std::runtime_error("Failed to bind gRPC server to " + addresses_[i]);
    }
    ports.push_back(*ports_[i]);
  }
  // The first call is asked for here: a thread asking as it starts could find the queue already
  // shut down by a Shutdown racing this start-up, and gRPC aborts on that.
  Call::Await(this, service_.get(), queue_.get());
  workers_->Start();
  SetServing(true);
  return ports;
}

void Server::SetModel(const std::string& name, std::map<int64_t, std::shared_ptr<Servable>> versions,
                      std::map<std::string, int64_t> labels) {
  std::lock_guard<std::mutex> lock(routes_mutex_);
  auto routes = std::make_shared<Routes>(*routes_);  // Copy on write: readers keep their snapshot.
  if (versions.empty()) {
    routes->erase(name);
  } else {
    (*routes)[name] = Model{std::move(versions), std::move(labels)};
  }
  routes_ = std::move(routes);
}

void Server::SetServing(bool serving) {
  if (!server_ || !options_.enable_health) return;
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  for (const char* service : kHealthServices) health->SetServingStatus(service, serving);
}

void Server::Shutdown(double grace_seconds) {
  std::lock_guard<std::mutex> lock(shutdown_mutex_);
  ShutdownLocked(grace_seconds);
}

void Server::ShutdownLocked(double grace_seconds) {
  if (shut_down_) return;
  shut_down_ = true;
  if (server_) {
    SetServing(false);
    // The queue's threads keep polling meanwhile: they finish the calls that shutdown cancels.
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::microseconds(static_cast<int64_t>(std::max(0.0, grace_seconds) * 1e6)));
  }
  StopQueue();
  fallback_pool_.Stop();
}

void Server::StopQueue() {
  if (!workers_) return;
  {
    std::unique_lock<std::shared_mutex> closing(queue_ops_mutex_);
    queue_open_ = false;
  }
  queue_->Shutdown();
  workers_->Join();  // Runs what sessions were left; drains the queue here if it was never polled.
  workers_.reset();
}

void Server::Handle(Call* call) {
  if (call->method() == kPredictMethod && TryPredict(call)) return;
  Fallback(call);
}

void Server::Fallback(Call* call) {
  fallback_pool_.Post([this, state = call->state(), method = call->method(), bytes = call->bytes(),
                       timeout_ms = call->TimeoutMs()] {
    {
      std::lock_guard<std::mutex> lock(state->mutex);
      if (state->answered) return;  // Cancelled while it waited: nobody wants the answer.
    }
    FallbackResult result;
    try {
      result = fallback_(method, bytes, timeout_ms);
    } catch (const std::exception& e) {  // Never lose a call: the Python side failed to answer.
      result = FallbackResult{kInternal, std::string("Fallback failed: ") + e.what(), ""};
    }
    Call::Answer(state, grpc::Status(static_cast<grpc::StatusCode>(result.code), result.message), result.response);
  });
}

}  // namespace fgr
