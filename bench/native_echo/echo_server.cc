// The native transport floor: a C++ PredictionService that answers every Predict with one fixed
// PredictResponse, shaped like the full graph's (`ids` [1, k] strings, `scores` [1, k] float32),
// the same answer as bench/echo_server.py, the Python floor.
//
// Like that server it does no model work but does decode each request and encode each response.
// It takes RPCs the way fgr-serve's native data plane does, from one async generic service's
// completion queue; its one thread polls the queue and answers. It links the same generated protos
// (serving/native/build.py builds it into build/native/echo_server).
//
//   build/native/echo_server --port=0 --port_file=/tmp/echo.port --k=100
//
// It writes `grpc=<port>` to --port_file (atomically) once serving, and stops on SIGTERM or SIGINT.

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>  // SerializationTraits of protobuf messages.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tensorflow_serving/apis/predict.pb.h"

namespace {

constexpr char kPredict[] = "/tensorflow.serving.PredictionService/Predict";

// bench/echo_server.py's fixed_response(k): model_spec {name: "echo", version 1}, `ids` as
// string_val "ad0000000".., `scores` as tensor_content of np.linspace(1, 0, k, dtype=float32).
tensorflow::serving::PredictResponse FixedResponse(int k) {
  tensorflow::serving::PredictResponse response;
  response.mutable_model_spec()->set_name("echo");
  response.mutable_model_spec()->mutable_version()->set_value(1);
  auto& outputs = *response.mutable_outputs();
  tensorflow::TensorProto& ids = outputs["ids"];
  ids.set_dtype(tensorflow::DT_STRING);
  ids.mutable_tensor_shape()->add_dim()->set_size(1);
  ids.mutable_tensor_shape()->add_dim()->set_size(k);
  for (int i = 0; i < k; ++i) {
    char id[32];
    std::snprintf(id, sizeof(id), "ad%07d", i);
    ids.add_string_val(id);
  }
  tensorflow::TensorProto& scores = outputs["scores"];
  scores.set_dtype(tensorflow::DT_FLOAT);
  scores.mutable_tensor_shape()->add_dim()->set_size(1);
  scores.mutable_tensor_shape()->add_dim()->set_size(k);
  std::vector<float> values(k);
  const double step = k > 1 ? -1.0 / (k - 1) : 0.0;  // numpy: start + i * step, then the end point.
  for (int i = 0; i < k; ++i) values[i] = static_cast<float>(1.0 + i * step);
  if (k > 1) values[k - 1] = 0.0f;
  scores.set_tensor_content(values.data(), values.size() * sizeof(float));  // Little-endian hosts.
  return response;
}

// One RPC: asked for on the queue, its request read and parsed as a PredictRequest, then answered
// with the fixed response. The queue's tag is the call; `stage` says which of its events came back.
struct EchoCall {
  enum class Stage { kArrived, kRead, kFinished };
  grpc::GenericServerContext context;
  grpc::GenericServerAsyncReaderWriter stream{&context};
  grpc::ByteBuffer request_buffer, response_buffer;
  Stage stage = Stage::kArrived;
};

// The I/O thread: asks for calls one at a time and moves each along as its events come back.
void Serve(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* queue,
           const tensorflow::serving::PredictResponse* response) {
  auto await = [&] {
    auto* call = new EchoCall;
    service->RequestCall(&call->context, &call->stream, queue, queue, call);
  };
  await();
  void* tag;
  bool ok;
  while (queue->Next(&tag, &ok)) {
    auto* call = static_cast<EchoCall*>(tag);
    switch (call->stage) {
      case EchoCall::Stage::kArrived:
        if (!ok) {  // Shutting down: no call came.
          delete call;
          break;
        }
        await();
        if (call->context.method() != kPredict) {
          call->stage = EchoCall::Stage::kFinished;
          call->stream.Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "the echo server only answers Predict"),
                              call);
          break;
        }
        call->stage = EchoCall::Stage::kRead;
        call->stream.Read(&call->request_buffer, call);
        break;
      case EchoCall::Stage::kRead: {
        call->stage = EchoCall::Stage::kFinished;
        tensorflow::serving::PredictRequest request;
        using Traits = grpc::SerializationTraits<tensorflow::serving::PredictRequest>;
        if (!ok || !Traits::Deserialize(&call->request_buffer, &request).ok()) {
          call->stream.Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "not a PredictRequest"), call);
          break;
        }
        bool own_buffer = false;
        grpc::Status encoded = grpc::SerializationTraits<tensorflow::serving::PredictResponse>::Serialize(
            *response, &call->response_buffer, &own_buffer);
        if (!encoded.ok()) {
          call->stream.Finish(encoded, call);
          break;
        }
        call->stream.WriteAndFinish(call->response_buffer, grpc::WriteOptions(), grpc::Status::OK, call);
        break;
      }
      case EchoCall::Stage::kFinished:
        delete call;
        break;
    }
  }
}

// --name=value flags; exits with a usage message on anything else.
std::string Flag(int argc, char** argv, const std::string& name, const std::string& fallback) {
  const std::string prefix = "--" + name + "=";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) return argv[i] + prefix.size();
  }
  return fallback;
}

void CheckFlags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    bool known = false;
    for (const char* name : {"--port=", "--port_file=", "--k=", "--host="}) {
      known = known || arg.rfind(name, 0) == 0;
    }
    if (!known) {
      std::cerr << "unknown flag " << arg << "\nusage: " << argv[0]
                << " [--port=0] [--port_file=PATH] [--k=100] [--host=127.0.0.1]\n";
      std::exit(2);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  CheckFlags(argc, argv);
  const std::string host = Flag(argc, argv, "host", "127.0.0.1");
  const int port = std::atoi(Flag(argc, argv, "port", "0").c_str());
  const std::string port_file = Flag(argc, argv, "port_file", "");
  const int k = std::atoi(Flag(argc, argv, "k", "100").c_str());

  // Block the stop signals before gRPC starts its threads, so only sigwait below receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  const tensorflow::serving::PredictResponse response = FixedResponse(k);
  grpc::AsyncGenericService service;
  grpc::ServerBuilder builder;
  int bound = 0;
  builder.AddListeningPort(host + ":" + std::to_string(port), grpc::InsecureServerCredentials(), &bound);
  builder.RegisterAsyncGenericService(&service);
  std::unique_ptr<grpc::ServerCompletionQueue> queue = builder.AddCompletionQueue();
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || bound == 0) {
    std::cerr << "cannot listen on " << host << ":" << port << "\n";
    return 1;
  }
  std::thread io_thread(Serve, &service, queue.get(), &response);
  std::cout << "native echo server on " << host << ":" << bound << " (k=" << k << ")" << std::endl;
  if (!port_file.empty()) {
    const std::string scratch = port_file + ".tmp";
    std::ofstream(scratch) << "grpc=" << bound << "\n";
    if (std::rename(scratch.c_str(), port_file.c_str()) != 0) {
      std::perror("writing --port_file");
      return 1;
    }
  }
  int received = 0;
  sigwait(&stop_signals, &received);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  queue->Shutdown();
  io_thread.join();
  return 0;
}
