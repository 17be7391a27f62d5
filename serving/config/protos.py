"""BatchingParameters, MonitoringConfig and SSLConfig, as TF Serving defines them.

`tensorflow-serving-api` ships the ModelServerConfig protos but not
`session_bundle_config.proto` (BatchingParameters), `monitoring_config.proto`
(MonitoringConfig) nor `ssl_config.proto` (SSLConfig), and there is no
protoc here. We therefore declare the same
messages (same package, names and field numbers as TF Serving's .proto files)
in a private descriptor pool, so TF Serving's text config files parse
unchanged.
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

_F = descriptor_pb2.FieldDescriptorProto
_INT64_VALUE = ".google.protobuf.Int64Value"


def _field(
  name: str, number: int, kind: int, type_name: str = "", repeated: bool = False
) -> descriptor_pb2.FieldDescriptorProto:
  field = _F(name=name, number=number, type=kind, label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
  if type_name:  # Set only for message fields: the pool refuses it on others.
    field.type_name = type_name
  return field


def _file(name: str, messages, dependency=()) -> descriptor_pb2.FileDescriptorProto:
  """A proto3 file of TF Serving's package holding `messages` ({message
  name: its fields}), in order."""
  proto = descriptor_pb2.FileDescriptorProto(
    name=f"fgr/tensorflow_serving/{name}", package="tensorflow.serving", syntax="proto3", dependency=list(dependency)
  )
  for message, fields in messages.items():
    proto.message_type.add(name=message).field.extend(fields)
  return proto


def _build_pool() -> descriptor_pool.DescriptorPool:
  pool = descriptor_pool.DescriptorPool()
  pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
  pool.Add(
    _file(
      "session_bundle_config.proto",
      {
        "BatchingParameters": [
          _field("max_batch_size", 1, _F.TYPE_MESSAGE, _INT64_VALUE),
          _field("batch_timeout_micros", 2, _F.TYPE_MESSAGE, _INT64_VALUE),
          _field("max_enqueued_batches", 3, _F.TYPE_MESSAGE, _INT64_VALUE),
          _field("num_batch_threads", 4, _F.TYPE_MESSAGE, _INT64_VALUE),
          _field("thread_pool_name", 5, _F.TYPE_MESSAGE, ".google.protobuf.StringValue"),
          _field("allowed_batch_sizes", 6, _F.TYPE_INT64, repeated=True),
          _field("pad_variable_length_inputs", 7, _F.TYPE_BOOL),
          _field("enable_large_batch_splitting", 8, _F.TYPE_MESSAGE, ".google.protobuf.BoolValue"),
          _field("max_execution_batch_size", 9, _F.TYPE_MESSAGE, _INT64_VALUE),
        ]
      },
      dependency=["google/protobuf/wrappers.proto"],
    )
  )
  pool.Add(
    _file(
      "monitoring_config.proto",
      {
        "PrometheusConfig": [_field("enable", 1, _F.TYPE_BOOL), _field("path", 2, _F.TYPE_STRING)],
        "MonitoringConfig": [_field("prometheus_config", 1, _F.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig")],
      },
    )
  )
  pool.Add(
    _file(
      "ssl_config.proto",
      {
        "SSLConfig": [
          _field("server_key", 1, _F.TYPE_STRING),
          _field("server_cert", 2, _F.TYPE_STRING),
          _field("custom_ca", 3, _F.TYPE_STRING),
          _field("client_verify", 4, _F.TYPE_BOOL),
        ]
      },
    )
  )
  return pool


_POOL = _build_pool()

BatchingParameters = message_factory.GetMessageClass(
  _POOL.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
)
MonitoringConfig = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))
SSLConfig = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.serving.SSLConfig"))
