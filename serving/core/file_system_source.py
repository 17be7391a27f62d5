"""Lists the versions of a model under its base path, and picks aspired ones."""

import os

from absl import logging
from tensorflow_serving.config import file_system_storage_path_source_pb2, model_server_config_pb2

from serving.servables import saved_model_bundle

VersionPolicy = file_system_storage_path_source_pb2.FileSystemStoragePathSourceConfig.ServableVersionPolicy


def list_versions(base_path: str) -> dict[int, str]:
  """Returns {version: path} for `<base_path>/<int>/` dirs holding a model.

  Directories without saved_model.pb (e.g. still being written) are skipped
  until a later poll sees them complete.
  """
  try:
    names = os.listdir(base_path)
  except (OSError, ValueError) as e:  # ValueError: a path no file system can hold (a NUL byte).
    logging.log_every_n_seconds(logging.WARNING, "Cannot list base path %s: %s", 60, base_path, e)
    return {}
  versions = {}
  for name in names:
    if not (name.isascii() and name.isdigit()) or int(name) >= 2**63:  # As TF Serving: int64s in ASCII.
      continue
    path = os.path.join(base_path, name)
    if saved_model_bundle.has_saved_model(path):
      versions[int(name)] = path
  return versions


def aspired_versions(on_disk: dict[int, str], config: model_server_config_pb2.ModelConfig) -> set[int]:
  """Applies the model's version policy (latest N, all, specific)."""
  policy = config.model_version_policy
  choice = policy.WhichOneof("policy_choice")
  if choice == "all":
    return set(on_disk)
  if choice == "specific":
    return set(policy.specific.versions) & set(on_disk)
  num = policy.latest.num_versions if choice == "latest" else 1
  return set(sorted(on_disk)[-max(1, num) :])


def missing_specific_versions(on_disk: dict[int, str], config: model_server_config_pb2.ModelConfig) -> list[int]:
  """The versions a `specific` policy names that are not on disk (sorted)."""
  policy = config.model_version_policy
  if policy.WhichOneof("policy_choice") != "specific":
    return []
  return sorted(set(policy.specific.versions) - set(on_disk))


def version_mtime(path: str) -> float:
  """Modification time of a version's saved_model proto (detects rewrites)."""
  for name in ("saved_model.pb", "saved_model.pbtxt"):
    try:
      return os.stat(os.path.join(path, name)).st_mtime
    except OSError:
      continue
  return 0.0
