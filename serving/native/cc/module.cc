// The Python bindings of the native data plane (`serving.native._fgr_native`).
//
// Every call that can block (loads, runs, waits, shutdown) releases the GIL. Python objects held by
// native threads (the fallback, batch budgets) are only touched with the GIL held, and are
// released with it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <stdexcept>

#include "batching.h"
#include "metrics.h"
#include "numpy_tensor.h"
#include "server.h"
#include "servable.h"
#include "session.h"
#include "tensor.h"
#include "tensorflow_serving/apis/predict.pb.h"
#include "tf_api.h"

namespace py = pybind11;

namespace fgr {
namespace {

PyObject* native_error = nullptr;

// A status message as Python text. TF's messages may hold raw bytes (an op echoing a request's value,
// e.g. ParseExample's "Could not parse example input, value: '...'"); pybind11's strict decoding would
// turn the error into a UnicodeDecodeError and lose its code.
py::str MessageText(const std::string& message) {
  PyObject* text = PyUnicode_DecodeUTF8(message.data(), static_cast<Py_ssize_t>(message.size()), "backslashreplace");
  if (text == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(text);
}

[[noreturn]] void Raise(const Status& status) {
  py::str message = MessageText(status.message);
  py::object error = py::reinterpret_borrow<py::object>(native_error)(status.code, message);
  error.attr("code") = status.code;
  error.attr("message") = message;
  PyErr_SetObject(native_error, error.ptr());
  throw py::error_already_set();
}

bool Finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

// A Python object native threads may hold: dropped with the GIL (or leaked at interpreter exit).
std::shared_ptr<py::object> Hold(py::object object) {
  return std::shared_ptr<py::object>(new py::object(std::move(object)), [](py::object* held) {
    if (!Py_IsInitialized() || Finalizing()) {
      held->release();
    } else {
      py::gil_scoped_acquire gil;
      delete held;
      return;
    }
    delete held;
  });
}

// Deletes a native object whose destructor may wait for native threads, without the GIL they need.
template <typename T>
std::shared_ptr<T> Own(T* object) {
  return std::shared_ptr<T>(object, [](T* owned) {
    if (Py_IsInitialized() && PyGILState_Check()) {
      py::gil_scoped_release release;
      delete owned;
    } else {
      delete owned;
    }
  });
}

std::optional<int64_t> OptionalInt(const py::handle& value) {
  if (value.is_none()) return std::nullopt;
  return value.cast<int64_t>();
}

// Python's wrappers.
struct PySession {
  std::shared_ptr<Session> session;
};

py::list RunSession(PySession& self, const py::dict& feeds, const std::vector<std::string>& fetches,
                    bool in_caller_thread) {
  Feeds in = ToFeeds(feeds);
  std::vector<TensorPtr> outputs;
  Status status;
  {
    py::gil_scoped_release release;
    status = self.session->Run(in.names, in.tensors, fetches, in_caller_thread, &outputs);
  }
  if (!status.ok()) Raise(status);
  std::vector<TensorSlice> slices;
  for (const TensorPtr& output : outputs) slices.push_back(TensorSlice{output, 0, -1});
  return Outputs(slices);
}

std::map<std::string, Signature> Signatures(const py::dict& signatures) {
  std::map<std::string, Signature> parsed;
  for (const auto& [key, value] : signatures) {
    py::tuple entry = value.cast<py::tuple>();
    Signature signature;
    signature.method_name = entry[0].cast<std::string>();
    for (const auto& [alias, info] : entry[1].cast<py::dict>()) {
      py::tuple input = info.cast<py::tuple>();
      SignatureInput parsed_input;
      parsed_input.tensor = input[0].cast<std::string>();
      parsed_input.dtype = input[1].cast<int>();
      parsed_input.known_rank = !input[2].is_none();
      if (parsed_input.known_rank) parsed_input.dims = input[2].cast<std::vector<int64_t>>();
      signature.inputs.emplace(alias.cast<std::string>(), std::move(parsed_input));
    }
    for (const auto& [alias, info] : entry[2].cast<py::dict>()) {
      py::tuple output = info.cast<py::tuple>();
      signature.outputs.emplace(alias.cast<std::string>(),
                                SignatureOutput{output[0].cast<std::string>(), output[1].cast<int>()});
    }
    py::tuple limits = entry[3].cast<py::tuple>();
    signature.max_elements = OptionalInt(limits[0]);
    signature.max_bytes = OptionalInt(limits[1]);
    parsed.emplace(key.cast<std::string>(), std::move(signature));
  }
  return parsed;
}

std::optional<BatchingConfig> Batching(const py::object& batching) {
  if (batching.is_none()) return std::nullopt;
  py::dict config = batching.cast<py::dict>();
  BatchingConfig parsed;
  parsed.scheduler = config["scheduler"].cast<std::shared_ptr<BatchScheduler>>();
  parsed.options.max_batch_size = config["max_batch_size"].cast<int64_t>();
  parsed.options.batch_timeout_micros = config["batch_timeout_micros"].cast<int64_t>();
  parsed.options.max_enqueued_batches = config["max_enqueued_batches"].cast<int64_t>();
  parsed.options.allowed_batch_sizes = config["allowed_batch_sizes"].cast<std::vector<int64_t>>();
  parsed.options.pad_variable_length_inputs = config["pad_variable_length_inputs"].cast<bool>();
  parsed.options.in_caller_thread = config["in_caller_thread"].cast<bool>();
  if (config.contains("budget") && !config["budget"].is_none()) {
    std::shared_ptr<py::object> budget = Hold(config["budget"]);
    parsed.budget = [budget](const std::vector<std::string>& names) {
      py::gil_scoped_acquire gil;
      py::tuple limits = (*budget)(names).cast<py::tuple>();
      return std::make_pair(OptionalInt(limits[0]), OptionalInt(limits[1]));
    };
  }
  return parsed;
}

// Waits, without the GIL, for a run's outcome; a timeout abandons a queued task.
struct Outcome {
  std::mutex mutex;
  std::condition_variable done_cv;
  bool done = false;
  Status status;
  std::vector<TensorSlice> outputs;
};

py::list RunServable(Servable& servable, const py::dict& feeds, const std::vector<std::string>& fetches,
                     std::optional<int64_t> timeout_ms, bool in_caller_thread) {
  Feeds in = ToFeeds(feeds);
  auto outcome = std::make_shared<Outcome>();
  Status status;
  std::vector<TensorSlice> outputs;
  {
    py::gil_scoped_release release;
    const int64_t timeout = timeout_ms.value_or(-1);
    TaskPtr task = servable.Run(in.names, in.tensors, fetches, timeout, in_caller_thread,
                                [outcome](const Status& result, std::vector<TensorSlice> slices) {
                                  std::lock_guard<std::mutex> lock(outcome->mutex);
                                  outcome->status = result;
                                  outcome->outputs = std::move(slices);
                                  outcome->done = true;
                                  outcome->done_cv.notify_all();
                                });
    std::unique_lock<std::mutex> lock(outcome->mutex);
    auto finished = [&] { return outcome->done; };
    if (timeout > 0 && task) {
      if (!outcome->done_cv.wait_for(lock, std::chrono::milliseconds(timeout), finished)) {
        task->abandoned = true;
        task->Drop();  // Its inputs are not held until its batch runs (`in` holds them until return).
        outcome->status = Status(kDeadlineExceeded,
                                 "Deadline of " + std::to_string(timeout) + " ms exceeded while waiting for a batch");
        outcome->done = true;
      }
    } else {
      outcome->done_cv.wait(lock, finished);
    }
    status = outcome->status;
    outputs = outcome->outputs;
  }
  if (!status.ok()) Raise(status);
  return Outputs(outputs);
}

FallbackResult CallFallback(const std::shared_ptr<py::object>& fallback, const std::string& method,
                            const std::string& request, int64_t timeout_ms) {
  py::gil_scoped_acquire gil;
  try {
    py::object timeout = timeout_ms < 0 ? py::object(py::none()) : py::object(py::int_(timeout_ms));
    py::tuple result = (*fallback)(method, py::bytes(request), timeout).cast<py::tuple>();
    return FallbackResult{result[0].cast<int>(), result[1].cast<std::string>(), result[2].cast<std::string>()};
  } catch (py::error_already_set& e) {
    return FallbackResult{kInternal, std::string("Python fallback raised: ") + e.what(), ""};
  }
}

}  // namespace
}  // namespace fgr

PYBIND11_MODULE(_fgr_native, m) {
  using namespace fgr;
  m.doc() = "fgr-serve's native data plane (serving/native/README.md).";
  native_error = PyErr_NewException("_fgr_native.NativeError", PyExc_RuntimeError, nullptr);
  m.attr("NativeError") = py::handle(native_error);

  m.def("init", &InitTf, py::arg("tf_library_dir"), "Resolves TensorFlow's C API from the loaded TF libraries.");

  m.def("live_counts", [] {
    py::dict counts;
    counts["tasks"] = LiveCount(Live::kTask).load();
    counts["calls"] = LiveCount(Live::kCall).load();
    counts["tensors"] = LiveCount(Live::kTensor).load();
    return counts;
  }, "Native request objects alive now (tasks queued or running, gRPC calls, tensors): 0 once idle.");

  m.def("parse_predict_request", [](const py::bytes& data) {
    tensorflow::serving::PredictRequest request;
    if (!request.ParseFromString(data.cast<std::string>())) Raise(Status(kInvalidArgument, "Malformed PredictRequest"));
    return py::bytes(request.SerializeAsString());
  });

  py::class_<PySession, std::shared_ptr<PySession>>(m, "Session")
      .def(py::init([](const std::string& export_dir, const std::vector<std::string>& tags, const py::bytes& config) {
             if (!TfReady()) Raise(Status(kFailedPrecondition, "init() has not resolved TensorFlow's C API"));
             const std::string config_bytes = config;
             Status status;
             std::unique_ptr<Session> session;
             {
               py::gil_scoped_release release;
               session = Session::Load(export_dir, tags, config_bytes, &status);
             }
             if (!session) Raise(status);
             auto wrapper = std::make_shared<PySession>();
             wrapper->session = Own(session.release());
             return wrapper;
           }),
           py::arg("export_dir"), py::arg("tags"), py::arg("session_config") = py::bytes())
      .def_property_readonly("meta_graph_def", [](PySession& self) { return py::bytes(self.session->meta_graph_def()); })
      .def("run", &RunSession, py::arg("feeds"), py::arg("fetches"), py::arg("in_caller_thread") = false)
      .def("close", [](PySession& self) { self.session->Close(); }, py::call_guard<py::gil_scoped_release>());

  py::class_<BatchScheduler, std::shared_ptr<BatchScheduler>>(m, "BatchScheduler")
      .def(py::init([](int threads) { return Own(new BatchScheduler(threads)); }), py::arg("num_batch_threads"))
      .def("drain", &BatchScheduler::Drain, py::call_guard<py::gil_scoped_release>())
      .def("stop", &BatchScheduler::Stop, py::call_guard<py::gil_scoped_release>());

  py::class_<Metrics, std::shared_ptr<Metrics>>(m, "Metrics")
      .def(py::init<std::vector<double>, std::vector<double>>(), py::arg("latency_bounds_us"), py::arg("batch_bounds"))
      .def("record_request", &Metrics::RecordRequest, py::call_guard<py::gil_scoped_release>())
      .def("snapshot", [](Metrics& self) {
        std::map<Metrics::RequestKey, Histogram> requests;
        std::map<std::string, Metrics::BatchStats> batches;
        {
          py::gil_scoped_release release;
          self.Snapshot(&requests, &batches);
        }
        py::list request_rows, batch_rows;
        for (const auto& [key, histogram] : requests) {
          const auto& [model, api, entrypoint, status] = key;
          request_rows.append(py::make_tuple(model, api, entrypoint, status, histogram.count, histogram.sum,
                                             histogram.buckets));
        }
        for (const auto& [model, stats] : batches) {
          batch_rows.append(py::make_tuple(model, stats.rows.count, stats.rows.sum, stats.rows.buckets,
                                           stats.padding.sum, stats.padding.buckets));
        }
        py::dict snapshot;
        snapshot["requests"] = request_rows;
        snapshot["batches"] = batch_rows;
        return snapshot;
      });

  py::class_<Admission, std::shared_ptr<Admission>>(m, "Admission")
      .def(py::init([](int64_t limit) {
             if (limit <= 0) throw std::invalid_argument("Admission limit must be positive");
             return std::make_shared<Admission>(limit);
           }),
           py::arg("limit"))
      .def("try_acquire", &Admission::TryAcquire)
      .def("release", &Admission::Release);

  py::class_<Servable, std::shared_ptr<Servable>>(m, "Servable")
      .def(py::init([](const PySession& session, const std::string& model, int64_t version, const py::dict& signatures,
                       const py::object& batching, std::shared_ptr<Metrics> metrics) {
             return Own(new Servable(session.session, model, version, Signatures(signatures), Batching(batching),
                                     std::move(metrics)));
           }),
           py::arg("session"), py::arg("model"), py::arg("version"), py::arg("signatures"),
           py::arg("batching") = py::none(), py::arg("metrics") = nullptr)
      .def("run", &RunServable, py::arg("feeds"), py::arg("fetches"), py::arg("timeout_ms") = py::none(),
           py::arg("in_caller_thread") = false)
      .def("close", &Servable::Close, py::call_guard<py::gil_scoped_release>());

  py::class_<Server, std::shared_ptr<Server>>(m, "Server")
      .def(py::init([](const py::function& fallback, std::shared_ptr<Metrics> metrics,
                       std::shared_ptr<Admission> admission, int max_receive_message_length,
                       const std::vector<std::pair<std::string, py::object>>& channel_args, const py::object& tls,
                       bool enable_health, int64_t max_batch_size_per_request, bool method_name_check,
                       bool as_tensor_content, int num_fallback_threads, bool unbatched_in_caller_thread) {
             ServerOptions options;
             options.max_receive_message_length = max_receive_message_length;
             for (const auto& [name, value] : channel_args) {
               if (py::isinstance<py::int_>(value)) {
                 options.channel_args.emplace_back(name, value.cast<int>());
               } else {
                 options.channel_args.emplace_back(name, py::str(value).cast<std::string>());
               }
             }
             if (!tls.is_none()) {
               py::tuple pems = tls.cast<py::tuple>();
               options.tls = true;
               options.key_pem = pems[0].cast<std::string>();
               options.cert_pem = pems[1].cast<std::string>();
               options.ca_pem = pems[2].cast<std::string>();
               options.client_verify = pems[3].cast<bool>();
             }
             options.enable_health = enable_health;
             options.max_batch_size_per_request = max_batch_size_per_request;
             options.method_name_check = method_name_check;
             options.as_tensor_content = as_tensor_content;
             options.num_fallback_threads = num_fallback_threads;
             options.unbatched_in_caller_thread = unbatched_in_caller_thread;
             std::shared_ptr<py::object> held = Hold(fallback);
             auto call = [held](const std::string& method, const std::string& request, int64_t timeout_ms) {
               return CallFallback(held, method, request, timeout_ms);
             };
             return Own(new Server(std::move(options), call, std::move(metrics), std::move(admission)));
           }),
           py::arg("fallback"), py::arg("metrics"), py::arg("admission"), py::arg("max_receive_message_length"),
           py::arg("channel_args"), py::arg("tls"), py::arg("enable_health"), py::arg("max_batch_size_per_request"),
           py::arg("method_name_check"), py::arg("as_tensor_content"), py::arg("num_fallback_threads"),
           py::arg("unbatched_in_caller_thread"))
      .def("add_port", &Server::AddPort, py::arg("address"))
      .def("start", &Server::Start, py::call_guard<py::gil_scoped_release>(),
           "Binds the ports added and starts serving; returns the bound ports in the order added.")
      .def("set_model", &Server::SetModel, py::arg("model"), py::arg("versions"), py::arg("labels"),
           py::call_guard<py::gil_scoped_release>())
      .def("set_serving", &Server::SetServing, py::call_guard<py::gil_scoped_release>())
      .def("shutdown", &Server::Shutdown, py::arg("grace_seconds"), py::call_guard<py::gil_scoped_release>());
}
