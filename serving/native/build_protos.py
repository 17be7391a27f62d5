"""The native build's first step: the C++ of the serving protos, generated from the installed `_pb2` modules.

The serving protos come from the serialized descriptors that the installed
`tensorflow_serving.apis.*_pb2` and `tensorflow.core.framework.*_pb2` modules carry. They are written as
one FileDescriptorSet (every transitive import included) and compiled by Debian's protoc with
`--descriptor_set_in` into `build/native/gen/`. The `google/protobuf/*` files are not generated:
libprotobuf already holds them, and a second copy aborts at start-up.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
from collections.abc import Sequence

if __package__:
  from serving.native import build_tools
else:  # Imported by build.py run as a script (Bazel's genrule): the siblings are on sys.path.
  import build_tools

# The protos the module compiles in; their imports are added (/work/native_api.md, "Layout").
PROTO_MODULES = (
  "tensorflow_serving.apis.predict_pb2",
  "tensorflow_serving.apis.model_pb2",
  "tensorflow.core.framework.tensor_pb2",
  "tensorflow.core.framework.tensor_shape_pb2",
  "tensorflow.core.framework.types_pb2",
  "tensorflow.core.framework.resource_handle_pb2",
)


def _protobuf_headers_version() -> tuple[int, int]:
  """(PROTOBUF_VERSION, PROTOBUF_MIN_PROTOC_VERSION) of the system protobuf headers libprotobuf matches."""
  include = build_tools.run([build_tools.tool("pkg-config"), "--variable=includedir", "protobuf"], "pkg-config").strip()
  path = os.path.join(include, "google", "protobuf", "port_def.inc")
  with open(path) as f:
    text = f.read()
  version = re.search(r"^#define PROTOBUF_VERSION (\d+)", text, re.M)
  min_protoc = re.search(r"^#define PROTOBUF_MIN_PROTOC_VERSION (\d+)", text, re.M)
  if not version or not min_protoc:
    raise build_tools.BuildError(f"no PROTOBUF_VERSION in {path}")
  return int(version.group(1)), int(min_protoc.group(1))


def _protoc() -> tuple[str, str]:
  """Debian's protoc, the one that matches libprotobuf's headers: (path, `libprotoc 3.21.12`)."""
  prefix = build_tools.run([build_tools.tool("pkg-config"), "--variable=prefix", "protobuf"], "pkg-config").strip()
  protoc = os.path.join(prefix, "bin", "protoc")
  if not os.access(protoc, os.X_OK):
    raise build_tools.BuildError(f"no {protoc}: apt-get install {build_tools.APT['protoc']}")
  version = build_tools.run([protoc, "--version"], "protoc --version").strip()
  library = build_tools.run([build_tools.tool("pkg-config"), "--modversion", "protobuf"], "pkg-config").strip()
  if not version.endswith(" " + library):
    raise build_tools.BuildError(
      f"{protoc} is {version} but libprotobuf is {library}: install matching Debian packages"
    )
  return protoc, version


def _newest_mtime(paths: Sequence[str]) -> float:
  return max((os.path.getmtime(p) for p in paths), default=0.0)


def _pb2_path(proto: str) -> str:
  """The installed `_pb2` module that carries `proto`'s descriptor (a/b/c.proto -> .../a/b/c_pb2.py)."""
  top, _, rest = proto.partition("/")
  return os.path.join(build_tools.package_dir(top), rest[: -len(".proto")] + "_pb2.py")


def _descriptor_set(modules: Sequence[str]) -> tuple[bytes, list[str]]:
  """One serialized FileDescriptorSet holding `modules`' files and every file they import, imports first."""
  # Importing the TF protos imports TensorFlow: quietly, and without Keras 3 (twice as fast, and no
  # matplotlib cache in $HOME, which Bazel's sandbox does not allow).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
  from google.protobuf import descriptor_pb2

  files = descriptor_pb2.FileDescriptorSet()
  seen: set[str] = set()

  def add(file_descriptor) -> None:
    if file_descriptor.name in seen:
      return
    seen.add(file_descriptor.name)
    for dependency in file_descriptor.dependencies:
      add(dependency)
    files.file.add().ParseFromString(file_descriptor.serialized_pb)

  for module in modules:
    add(importlib.import_module(module).DESCRIPTOR)
  return files.SerializeToString(), [f.name for f in files.file]


def generate_protos(gen_dir: str, scratch_dir: str, force: bool = False) -> list[str]:
  """Generates the C++ of PROTO_MODULES (and their imports) into gen_dir; returns the .pb.cc files.

  Args:
    gen_dir: where the generated .pb.h and .pb.cc files go, with a stamp (protos.json).
    scratch_dir: an existing folder for protoc's temporary output.
    force: regenerate even when the stamp says the files are up to date.
  """
  stamp = os.path.join(gen_dir, "protos.json")
  protoc, protoc_version = _protoc()
  header_version, header_min_protoc = _protobuf_headers_version()
  if os.path.exists(stamp) and not force:
    with open(stamp) as f:
      state = json.load(f)
    sources = [os.path.join(gen_dir, p[: -len(".proto")] + ".pb.cc") for p in state["generated"]]
    inputs = [os.path.abspath(__file__)] + [_pb2_path(p) for p in state["files"]]
    if (
      state["modules"] == list(PROTO_MODULES)
      and state["protoc"] == protoc_version
      and all(os.path.exists(s) for s in sources)
      and os.path.getmtime(stamp) >= _newest_mtime(inputs)
    ):
      return sources

  build_tools.log(f"generating protos with {protoc} ({protoc_version})")
  serialized, files = _descriptor_set(PROTO_MODULES)
  generated = [f for f in files if not f.startswith("google/protobuf/")]
  os.makedirs(gen_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=scratch_dir) as scratch:
    descriptor_set = os.path.join(scratch, "descriptors.pb")
    with open(descriptor_set, "wb") as f:
      f.write(serialized)
    out = os.path.join(scratch, "out")
    os.makedirs(out)
    build_tools.run([protoc, f"--descriptor_set_in={descriptor_set}", f"--cpp_out={out}", *generated], "protoc")
    for proto in generated:
      for suffix in (".pb.h", ".pb.cc"):
        name = proto[: -len(".proto")] + suffix
        _check_generated_version(os.path.join(out, name), header_version, header_min_protoc)
        build_tools.replace_if_changed(os.path.join(out, name), os.path.join(gen_dir, name))
  with open(stamp + ".tmp", "w") as f:
    json.dump({"modules": list(PROTO_MODULES), "protoc": protoc_version, "files": files, "generated": generated}, f)
  os.replace(stamp + ".tmp", stamp)
  return [os.path.join(gen_dir, p[: -len(".proto")] + ".pb.cc") for p in generated]


def _check_generated_version(path: str, header_version: int, header_min_protoc: int) -> None:
  """Fails unless the code protoc generated compiles against the system protobuf headers.

  Generated headers say which headers they accept (`#if PROTOBUF_VERSION < N` and
  `#if M < PROTOBUF_MIN_PROTOC_VERSION`); a mismatch would otherwise only show as an #error.
  """
  if not path.endswith(".pb.h"):
    return
  with open(path) as f:
    text = f.read()
  needs = re.search(r"#if PROTOBUF_VERSION < (\d+)", text)
  made_by = re.search(r"#if (\d+) < PROTOBUF_MIN_PROTOC_VERSION", text)
  if not needs or not made_by:
    raise build_tools.BuildError(f"{path}: no protobuf version guard; was it generated by Debian's protoc?")
  if header_version < int(needs.group(1)) or int(made_by.group(1)) < header_min_protoc:
    raise build_tools.BuildError(
      f"{path} was generated by protoc {made_by.group(1)} for headers >= {needs.group(1)}, but the system "
      f"headers are {header_version} (accepting protoc >= {header_min_protoc}): use Debian's protoc"
    )
