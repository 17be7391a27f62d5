"""fgr-serve's flags: TF Serving's, with its names and defaults, and fgr-serve's own.

TF Serving flags for features fgr-serve does not implement are declared too, so that setting one
fails with a clear message instead of being ignored. Importing this module defines them all.
"""

import os

from absl import app, flags

from serving.util import allocator

_DEFAULT_THREADS = 4 * (os.cpu_count() or 1)

FLAGS = flags.FLAGS

# Network.
flags.DEFINE_integer(
  "port",
  8500,
  "TCP port to listen on for the gRPC API. 0 picks a free "
  "port (printed as 'FGR_SERVE_GRPC_PORT=<port>' and "
  "written to --port_file).",
)
flags.DEFINE_string(
  "host",
  "127.0.0.1",
  "Address the gRPC and REST servers bind to. Defaults to "
  "loopback only; use 0.0.0.0 (or '[::]') to listen on all "
  "interfaces as TF Serving does.",
)
flags.DEFINE_string(
  "port_file", "", "If set, write the bound ports to this file once serving ('grpc=<port>' and 'rest=<port>' lines)."
)
flags.DEFINE_string("grpc_socket_path", "", "If non-empty, also listen for gRPC on this UNIX socket.")
flags.DEFINE_integer(
  "rest_api_port",
  0,
  "Port for the HTTP/REST API; 0 disables it (TF Serving "
  "docs use 8501). Must differ from --port. -1 (not a TF "
  "Serving value) picks a free port, printed as "
  "'FGR_SERVE_REST_PORT=<port>' and written to "
  "--port_file.",
)
flags.DEFINE_integer("rest_api_num_threads", _DEFAULT_THREADS, "Number of threads for HTTP/REST API processing.")
flags.DEFINE_integer("rest_api_timeout_in_ms", 30000, "Timeout for HTTP/REST API calls.")
flags.DEFINE_bool("rest_api_enable_cors_support", False, "Enable CORS headers in response.")
flags.DEFINE_integer("grpc_max_threads", _DEFAULT_THREADS, "Max gRPC server threads to handle gRPC messages.")
flags.DEFINE_string(
  "grpc_channel_arguments", "", "Comma-separated key=value gRPC server arguments, e.g. grpc.max_connection_age_ms=2000."
)
flags.DEFINE_bool(
  "enable_grpc_healthcheck_service", False, "Enable the standard gRPC health checking service (grpc.health.v1.Health)."
)
# Models.
flags.DEFINE_string("model_name", "default", "Name of model (ignored if --model_config_file is set).")
flags.DEFINE_string(
  "model_base_path",
  "",
  "Path to export (ignored if --model_config_file is set, "
  "otherwise required). Versions live in "
  "<model_base_path>/<integer>/saved_model.pb.",
)
flags.DEFINE_string(
  "model_config_file", "", "If non-empty, read a text ModelServerConfig from this file and serve the models it lists."
)
flags.DEFINE_integer(
  "model_config_file_poll_wait_seconds",
  0,
  "Interval in seconds between polls of --model_config_file; 0 reads it only at start-up.",
)
flags.DEFINE_integer(
  "file_system_poll_wait_seconds",
  1,
  "Interval in seconds between polls of the file system "
  "for new model versions. 0 polls once at start-up; "
  "negative disables polling.",
)
flags.DEFINE_bool(
  "allow_version_labels_for_unavailable_models",
  False,
  "Allow assigning version labels to versions that are not yet available.",
)
flags.DEFINE_integer("num_load_threads", 0, "Threads loading servables (0: loads run one at a time).")
flags.DEFINE_integer("num_unload_threads", 0, "Threads unloading servables (0: one at a time).")
flags.DEFINE_integer("max_num_load_retries", 5, "Times a failed load is retried before giving up.")
flags.DEFINE_integer("load_retry_interval_micros", 60 * 1000 * 1000, "Interval, in microseconds, between load retries.")
flags.DEFINE_bool(
  "flush_filesystem_caches",
  True,
  "Accepted for compatibility: fgr-serve keeps no file-system caches, so there is nothing to flush.",
)
flags.DEFINE_string("saved_model_tags", "serve", "Comma-separated MetaGraph tags to load.")
flags.DEFINE_integer(
  "tensorflow_session_parallelism",
  0,
  "Threads for a TF session (sets both intra and inter op pools); 0 auto-configures.",
)
flags.DEFINE_integer("tensorflow_intra_op_parallelism", 0, "Threads to parallelise a single op; 0 auto-configures.")
flags.DEFINE_integer(
  "tensorflow_inter_op_parallelism",
  0,
  "Ops run concurrently; 0 auto-configures (natively, an unbatched request's ops then run in the thread that "
  "read it), -1 runs every op in its caller's thread.",
)
flags.DEFINE_string("tensorflow_session_config_file", "", "If non-empty, a text ConfigProto for the TF sessions.")
flags.DEFINE_enum(
  "allocator",
  allocator.MIMALLOC,
  allocator.CHOICES,
  "The process's malloc. mimalloc (the default; pip package "
  "cmeel-mimalloc, on Linux) is preloaded by re-executing the "
  "process once, same pid: its per-thread heaps keep version "
  "loads from stalling requests on a shared malloc lock, and it "
  "has no malloc_trim for protobuf to call mid-request. "
  "'system' keeps the C library's. Not a TF Serving flag.",
)
flags.DEFINE_bool(
  "retain_freed_memory",
  True,
  "Keep memory freed by unloaded versions in the process for "
  "the next version (mimalloc: no purging; glibc: one arena, "
  "no mmap'd blocks, no trimming), and load each model's first "
  "version twice at start-up (unloading the copy) so the next "
  "version reuses its pages. Versions then load without "
  "touching fresh pages, which stalls requests on VMs that "
  "return freed pages to the host. Memory reaches its peak "
  "(two versions, as during a swap) at start-up. Under glibc, "
  "protobuf's periodic heap trim still hands some back after "
  "a swap, stalling requests. Costs: docs/performance.md. "
  "Not a TF Serving flag.",
)
flags.DEFINE_bool(
  "enable_model_warmup", True, "Replay assets.extra/tf_serving_warmup_requests before a version serves."
)
flags.DEFINE_integer("num_request_iterations_for_warmup", 0, "Times each warm-up request is replayed (if > 0).")
flags.DEFINE_bool(
  "enable_signature_method_name_check",
  False,
  "Check signatures' method_name, as TF1 exports set it: "
  "Predict then needs predict, classify or regress; Classify "
  "and MultiInference classification tasks need classify; "
  "Regress and regression tasks need regress. Off (as in TF "
  "Serving), Classify and Regress take any signature whose "
  "inputs and outputs fit, such as those of "
  "tf.saved_model.save, which are all 'predict'.",
)
flags.DEFINE_bool(
  "enable_serialization_as_tensor_content", False, "Answer Predict with tensor_content instead of typed value fields."
)
# Batching and monitoring.
flags.DEFINE_bool("enable_batching", False, "Enable server-side batching.")
flags.DEFINE_string("batching_parameters_file", "", "If non-empty, a text BatchingParameters file.")
flags.DEFINE_string(
  "monitoring_config_file",
  "",
  "If non-empty, a text MonitoringConfig; Prometheus metrics are served on --rest_api_port.",
)
flags.DEFINE_bool("version", False, "Display version and exit.")
flags.DEFINE_string(
  "ssl_config_file",
  "",
  "If non-empty, a text SSLConfig (server_key, server_cert "
  "and custom_ca as PEM contents, client_verify): the gRPC "
  "TCP port then serves TLS only (mutual TLS with "
  "client_verify). REST and UNIX sockets stay plaintext.",
)
# Ours.
flags.DEFINE_enum(
  "native",
  "auto",
  ["auto", "on", "off"],
  "The native data plane (C++, serving/native) behind the gRPC port: it "
  "answers Predict without Python and hands every other call to the "
  "Python implementation. auto: native when the module is built, else the "
  "Python path (logged once, with the reason); on: native, or fail at "
  "start-up; off: the Python gRPC front end. REST, metrics, version "
  "management and warm-up stay in Python either way. Not a TF Serving flag.",
)
flags.DEFINE_bool(
  "load_scann_ops",
  True,
  "Import scann (if installed) before loading models so SavedModels with a ScaNN index find their Scann>... ops.",
)
flags.DEFINE_integer(
  "grpc_max_receive_message_length",
  64 << 20,
  "Largest gRPC request accepted, in bytes; larger ones "
  "fail with RESOURCE_EXHAUSTED before being parsed. "
  "-1 or 0: no limit (TF Serving's behaviour).",
)
flags.DEFINE_integer(
  "rest_api_max_body_bytes",
  64 << 20,
  "Largest REST request body, in bytes; larger ones are answered HTTP 413 unread. A chunked body "
  "counts its chunk sizes, extensions and trailers too. 0: no limit.",
)
flags.DEFINE_integer(
  "rest_api_max_connections",
  0,
  "Most REST connections open at once; at the limit a new connection replaces the one that has "
  "waited longest between or inside requests (or is refused HTTP 503 while every connection has a "
  "request being handled). 0: half the process's open-file limit (RLIMIT_NOFILE). -1: no limit. "
  "An fgr-serve extension, not a TF Serving flag.",
)
flags.DEFINE_integer(
  "rest_api_max_buffered_bytes",
  0,
  "Most bytes of REST requests read and not yet answered, over all connections; a request that "
  "would take the total past it is refused HTTP 429 (RESOURCE_EXHAUSTED) and its connection "
  "closed. 0: 4 x --rest_api_max_body_bytes, at least 256 MiB. -1: no limit. An fgr-serve "
  "extension, not a TF Serving flag.",
)
flags.DEFINE_integer(
  "max_batch_size_per_request",
  0,
  "Most rows (dim 0 of Predict inputs, or examples of "
  "Classify/Regress/MultiInference) one request may carry; "
  "more fail with INVALID_ARGUMENT. 0: no limit.",
)
flags.DEFINE_integer(
  "max_in_flight_requests",
  0,
  "Most inference/metadata requests run at once across "
  "gRPC and REST; one more fails at once with "
  "RESOURCE_EXHAUSTED (HTTP 429) instead of queueing. "
  "0: no limit.",
)
flags.DEFINE_integer(
  "max_elements_per_request",
  0,
  "Most tensor elements one inference request may expand "
  "to, summed over its inputs, counted from declared "
  "shapes before decoding (a TensorProto with fewer values "
  "than its shape is filled, and a tf.Example context is "
  "repeated per example); more fail with "
  "RESOURCE_EXHAUSTED (HTTP 413). 0: derived from the "
  "signature, each input's static shape per row (unknown "
  "inner dimensions: 256 elements per row) times "
  "--expansion_limit_rows. -1: no limit. An fgr-serve "
  "extension, not a TF Serving flag.",
)
flags.DEFINE_integer(
  "max_bytes_per_request",
  0,
  "Most bytes one inference request may expand to "
  "(numbers by dtype size, strings by their length); more "
  "fail with RESOURCE_EXHAUSTED (HTTP 413). 0: derived, "
  "the --max_elements_per_request budget times the dtype "
  "size (strings: 1 KiB each), and at least 64 MiB. "
  "-1: no limit. An fgr-serve extension, not a TF Serving "
  "flag.",
)
flags.DEFINE_integer(
  "max_elements_per_batch",
  0,
  "With --enable_batching, most tensor elements one "
  "merged batch holds: a request that would cross it "
  "starts the next batch, one over it by itself fails "
  "with RESOURCE_EXHAUSTED. 0: derived as for "
  "--max_elements_per_request at max_batch_size rows. "
  "-1: no limit. An fgr-serve extension, not a TF Serving "
  "flag.",
)
flags.DEFINE_integer(
  "max_bytes_per_batch",
  0,
  "With --enable_batching, most bytes one merged batch "
  "holds (as --max_elements_per_batch). 0: derived as for "
  "--max_bytes_per_request at max_batch_size rows. -1: no "
  "limit. An fgr-serve extension, not a TF Serving flag.",
)
flags.DEFINE_integer(
  "expansion_limit_rows",
  4096,
  "Rows per request the derived --max_elements_per_request "
  "and --max_bytes_per_request allow for. An fgr-serve "
  "extension, not a TF Serving flag.",
)
flags.DEFINE_list(
  "model_base_path_roots",
  [],
  "If set, comma-separated directories every model's "
  "base_path (from --model_base_path, --model_config_file or "
  "a reload RPC) and every version directory must resolve "
  "under, after following symlinks and '..'.",
)

# TF Serving flags for features fgr-serve does not implement, with why.
_UNSUPPORTED = {
  "use_alts_credentials": (False, "Google ALTS credentials are not available outside Google Cloud"),
  "platform_config_file": ("", "only the TensorFlow SavedModel platform is served"),
  "per_process_gpu_memory_fraction": (0.0, "fgr-serve runs on CPU"),
  "enable_per_model_batching_parameters": (False, "use one --batching_parameters_file for all models"),
  "remove_unused_fields_from_bundle_metagraph": (True, "the MetaGraph is kept whole"),
  "prefer_tflite_model": (False, "TensorFlow Lite models are not served"),
  "num_tflite_pools": (0, "TensorFlow Lite models are not served"),
  "num_tflite_interpreters_per_pool": (0, "TensorFlow Lite models are not served"),
  "xla_cpu_compilation_enabled": (False, "XLA JIT is not configurable here"),
  "xla_gpu_compilation_enabled": (False, "fgr-serve runs on CPU"),
  "enable_profiler": (True, "the TF profiler service is not exposed"),
  "thread_pool_factory_config_file": ("", "custom thread pool factories are not supported"),
  "mixed_precision": ("", "mixed-precision rewriting is not supported"),
  "skip_initialize_tpu": (False, "fgr-serve runs on CPU"),
}

for _name, (_default, _why) in _UNSUPPORTED.items():
  _help = f"Not supported by fgr-serve ({_why}); setting it is an error."
  if isinstance(_default, bool):
    flags.DEFINE_bool(_name, _default, _help)
  elif isinstance(_default, int):
    flags.DEFINE_integer(_name, _default, _help)
  elif isinstance(_default, float):
    flags.DEFINE_float(_name, _default, _help)
  else:
    flags.DEFINE_string(_name, _default, _help)


def check_unsupported_flags() -> None:
  """Fails if a TF Serving flag we don't implement was set."""
  for name, (_, why) in _UNSUPPORTED.items():
    if FLAGS[name].present:
      raise app.UsageError(f"--{name} is a TensorFlow Serving flag that fgr-serve does not support: {why}.")
