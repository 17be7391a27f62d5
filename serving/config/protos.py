"""BatchingParameters, MonitoringConfig and SSLConfig, as TF Serving defines them.

`tensorflow-serving-api` ships the ModelServerConfig protos but not
`session_bundle_config.proto` (BatchingParameters), `monitoring_config.proto`
(MonitoringConfig) nor `ssl_config.proto` (SSLConfig), and there is no
protoc here. We therefore declare the same
messages (same package, names and field numbers as TF Serving's .proto files)
in a private descriptor pool, so TF Serving's text config files parse
unchanged.
"""

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import wrappers_pb2

_F = descriptor_pb2.FieldDescriptorProto


def _field(message, name, number, kind, type_name=None, repeated=False):
  field = message.field.add(name=name, number=number, type=kind)
  field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
  if type_name:
    field.type_name = type_name


def _build_pool() -> descriptor_pool.DescriptorPool:
  pool = descriptor_pool.DescriptorPool()
  pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)

  batching = descriptor_pb2.FileDescriptorProto(
      name="fgr/tensorflow_serving/session_bundle_config.proto",
      package="tensorflow.serving", syntax="proto3",
      dependency=["google/protobuf/wrappers.proto"])
  params = batching.message_type.add(name="BatchingParameters")
  int64_value = ".google.protobuf.Int64Value"
  _field(params, "max_batch_size", 1, _F.TYPE_MESSAGE, int64_value)
  _field(params, "batch_timeout_micros", 2, _F.TYPE_MESSAGE, int64_value)
  _field(params, "max_enqueued_batches", 3, _F.TYPE_MESSAGE, int64_value)
  _field(params, "num_batch_threads", 4, _F.TYPE_MESSAGE, int64_value)
  _field(params, "thread_pool_name", 5, _F.TYPE_MESSAGE,
         ".google.protobuf.StringValue")
  _field(params, "allowed_batch_sizes", 6, _F.TYPE_INT64, repeated=True)
  _field(params, "pad_variable_length_inputs", 7, _F.TYPE_BOOL)
  _field(params, "enable_large_batch_splitting", 8, _F.TYPE_MESSAGE,
         ".google.protobuf.BoolValue")
  _field(params, "max_execution_batch_size", 9, _F.TYPE_MESSAGE, int64_value)
  pool.Add(batching)

  monitoring = descriptor_pb2.FileDescriptorProto(
      name="fgr/tensorflow_serving/monitoring_config.proto",
      package="tensorflow.serving", syntax="proto3")
  prometheus = monitoring.message_type.add(name="PrometheusConfig")
  _field(prometheus, "enable", 1, _F.TYPE_BOOL)
  _field(prometheus, "path", 2, _F.TYPE_STRING)
  config = monitoring.message_type.add(name="MonitoringConfig")
  _field(config, "prometheus_config", 1, _F.TYPE_MESSAGE,
         ".tensorflow.serving.PrometheusConfig")
  pool.Add(monitoring)

  ssl = descriptor_pb2.FileDescriptorProto(
      name="fgr/tensorflow_serving/ssl_config.proto",
      package="tensorflow.serving", syntax="proto3")
  ssl_config = ssl.message_type.add(name="SSLConfig")
  _field(ssl_config, "server_key", 1, _F.TYPE_STRING)
  _field(ssl_config, "server_cert", 2, _F.TYPE_STRING)
  _field(ssl_config, "custom_ca", 3, _F.TYPE_STRING)
  _field(ssl_config, "client_verify", 4, _F.TYPE_BOOL)
  pool.Add(ssl)
  return pool


_POOL = _build_pool()

BatchingParameters = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))
MonitoringConfig = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))
SSLConfig = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.serving.SSLConfig"))
