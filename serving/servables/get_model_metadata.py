"""GetModelMetadata: the servable's SignatureDefMap packed into an Any."""

from tensorflow_serving.apis import get_model_metadata_pb2

from serving import errors
from serving.servables import saved_model_bundle

SIGNATURE_DEF_FIELD = "signature_def"


def validate_request(request: get_model_metadata_pb2.GetModelMetadataRequest) -> None:
  """Rejects requests TF Serving rejects (no or unknown metadata fields)."""
  if not request.metadata_field:
    raise errors.invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
  for field in request.metadata_field:
    if field != SIGNATURE_DEF_FIELD:
      raise errors.invalid_argument(f"Metadata field {field} is not supported")


def model_metadata(bundle: saved_model_bundle.SavedModelBundle) -> get_model_metadata_pb2.GetModelMetadataResponse:
  """Returns the metadata response for one loaded servable."""
  signature_map = get_model_metadata_pb2.SignatureDefMap()
  for key, signature in bundle.signature_defs.items():
    signature_map.signature_def[key].CopyFrom(signature)
  response = get_model_metadata_pb2.GetModelMetadataResponse()
  bundle.fill_model_spec(response.model_spec)
  response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
  return response
