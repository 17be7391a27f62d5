"""Builds fgr-serve's native data plane: `python -m serving.native.build` (run by `make install`).

Three steps, each skipped when its outputs are newer than its inputs:

1. Protos. The serving protos come from the serialized descriptors that the installed
   `tensorflow_serving.apis.*_pb2` and `tensorflow.core.framework.*_pb2` modules carry. They are
   written as one FileDescriptorSet (every transitive import included) and compiled by Debian's protoc
   with `--descriptor_set_in` into `build/native/gen/`. The `google/protobuf/*` files are not
   generated: libprotobuf already holds them, and a second copy aborts at start-up.
2. Objects. Every `serving/native/cc/*.cc`, benchmark program source (PROGRAMS) and generated `.pb.cc` is
   compiled, in parallel, with the system gRPC and protobuf headers. TensorFlow's wheel headers are
   searched last and only for `tensorflow/c/*`: they also ship protobuf 5 and absl headers, which must
   not replace the system ones.
3. Links. `serving/native/_fgr_native<EXT_SUFFIX>` exports only EXPORTS (hidden visibility, a
   version script, `-Bsymbolic`) and links libgrpc++ and libprotobuf but never TensorFlow.
   `build/native/<program>` are the benchmarks' native programs (PROGRAMS): the echo
   PredictionService and the load client.

serving/native/README.md says why the module is linked this way.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE_NAME = "_fgr_native"

# The protos the module compiles in; their imports are added (/work/native_api.md, "Layout").
PROTO_MODULES = (
  "tensorflow_serving.apis.predict_pb2",
  "tensorflow_serving.apis.model_pb2",
  "tensorflow.core.framework.tensor_pb2",
  "tensorflow.core.framework.tensor_shape_pb2",
  "tensorflow.core.framework.types_pb2",
  "tensorflow.core.framework.resource_handle_pb2",
)

CXXFLAGS = ("-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-pthread")
# The module's dynamic symbol table: its init function, and the allocator of cc/allocator_bridge.cc.
# Under RTLD_DEEPBIND the libraries loaded with the module (gRPC, protobuf, absl) look malloc up in
# the module first; the bridge forwards them to the process's allocator. Everything else (our code,
# the generated tensorflow:: proto classes, inline protobuf and gRPC code) stays inside the module.
EXPORTS = (f"PyInit_{MODULE_NAME}", "malloc", "free", "calloc", "realloc", "posix_memalign", "aligned_alloc")
EXPORTS += ("memalign", "valloc", "malloc_usable_size")
VERSION_SCRIPT = "{\n  global:\n" + "".join(f"    {name};\n" for name in EXPORTS) + "  local: *;\n};\n"

# The benchmarks' native programs: name in build/native/ -> (source folder, links the generated protos).
PROGRAMS = {
  "echo_server": ("bench/native_echo", True),  # The native echo PredictionService (transport floor).
  "fgr_load_client": ("bench/native_load", False),  # A gRPC load generator cheaper than the Python one.
}

# What provides each tool, header or library the build needs (Debian packages).
APT = {
  "g++": "g++",
  "nm": "binutils",
  "pkg-config": "pkg-config",
  "protoc": "protobuf-compiler",
  "protobuf": "libprotobuf-dev",
  "grpc++": "libgrpc++-dev",
  "pybind11": "pybind11-dev",
  "Python.h": "python3-dev",
}


class BuildError(Exception):
  """The build cannot go on; the message says what to install or fix."""


@dataclasses.dataclass
class Paths:
  """Where the build reads and writes.

  Args:
    repo: the checkout (its serving/native/cc and PROGRAMS' folders hold the sources).
    build_dir: generated code and objects.
    module: the Python extension to write.
    programs_dir: where PROGRAMS go (default: build_dir).
  """

  repo: str = REPO
  build_dir: str = ""
  module: str = ""
  programs_dir: str = ""

  def __post_init__(self):
    self.build_dir = self.build_dir or os.path.join(self.repo, "build", "native")
    self.module = self.module or os.path.join(self.repo, "serving", "native", MODULE_NAME + ext_suffix())
    self.programs_dir = self.programs_dir or self.build_dir

  @property
  def gen_dir(self) -> str:
    return os.path.join(self.build_dir, "gen")

  @property
  def obj_dir(self) -> str:
    return os.path.join(self.build_dir, "obj")


def ext_suffix() -> str:
  """The extension-module suffix of this interpreter, e.g. `.cpython-311-x86_64-linux-gnu.so`."""
  return sysconfig.get_config_var("EXT_SUFFIX")


def program_path(name: str, repo: str = REPO) -> str:
  """Where `make install` puts one of PROGRAMS, e.g. `build/native/echo_server`."""
  return os.path.join(repo, "build", "native", name)


def _log(message: str) -> None:
  print(f"[native build] {message}", flush=True)


def _run(command: Sequence[str], what: str) -> str:
  result = subprocess.run(list(command), capture_output=True, text=True)
  if result.returncode != 0:
    raise BuildError(f"{what} failed ({result.returncode}):\n$ {shlex.join(command)}\n{result.stdout}{result.stderr}")
  return result.stdout


def _tool(name: str) -> str:
  path = shutil.which(name)
  if not path:
    raise BuildError(f"`{name}` not found: apt-get install {APT[name]}")
  return path


def _package_dir(package: str) -> str:
  """A top-level package's directory, found without importing it (importing TensorFlow takes seconds)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise BuildError(f"Python package `{package}` is not installed in {sys.prefix}: run `make install`")
  return list(spec.submodule_search_locations)[0]


def _pkg_config(*args: str) -> list[str]:
  pkg_config = _tool("pkg-config")
  for module in ("grpc++", "protobuf"):
    if subprocess.run([pkg_config, "--exists", module]).returncode != 0:
      raise BuildError(f"pkg-config finds no `{module}`: apt-get install {APT[module]}")
  return shlex.split(_run([pkg_config, *args, "grpc++", "protobuf"], "pkg-config"))


def _protobuf_headers_version() -> tuple[int, int]:
  """(PROTOBUF_VERSION, PROTOBUF_MIN_PROTOC_VERSION) of the system protobuf headers libprotobuf matches."""
  include = _run([_tool("pkg-config"), "--variable=includedir", "protobuf"], "pkg-config").strip()
  path = os.path.join(include, "google", "protobuf", "port_def.inc")
  with open(path) as f:
    text = f.read()
  version = re.search(r"^#define PROTOBUF_VERSION (\d+)", text, re.M)
  min_protoc = re.search(r"^#define PROTOBUF_MIN_PROTOC_VERSION (\d+)", text, re.M)
  if not version or not min_protoc:
    raise BuildError(f"no PROTOBUF_VERSION in {path}")
  return int(version.group(1)), int(min_protoc.group(1))


def _protoc() -> tuple[str, str]:
  """Debian's protoc, the one that matches libprotobuf's headers: (path, `libprotoc 3.21.12`)."""
  prefix = _run([_tool("pkg-config"), "--variable=prefix", "protobuf"], "pkg-config").strip()
  protoc = os.path.join(prefix, "bin", "protoc")
  if not os.access(protoc, os.X_OK):
    raise BuildError(f"no {protoc}: apt-get install {APT['protoc']}")
  version = _run([protoc, "--version"], "protoc --version").strip()
  library = _run([_tool("pkg-config"), "--modversion", "protobuf"], "pkg-config").strip()
  if not version.endswith(" " + library):
    raise BuildError(f"{protoc} is {version} but libprotobuf is {library}: install matching Debian packages")
  return protoc, version


def _newest_mtime(paths: Sequence[str]) -> float:
  return max((os.path.getmtime(p) for p in paths), default=0.0)


def _pb2_path(proto: str) -> str:
  """The installed `_pb2` module that carries `proto`'s descriptor (a/b/c.proto -> .../a/b/c_pb2.py)."""
  top, _, rest = proto.partition("/")
  return os.path.join(_package_dir(top), rest[: -len(".proto")] + "_pb2.py")


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


def generate_protos(paths: Paths, force: bool = False) -> list[str]:
  """Generates the C++ of PROTO_MODULES (and their imports) into gen_dir; returns the .pb.cc files."""
  stamp = os.path.join(paths.gen_dir, "protos.json")
  protoc, protoc_version = _protoc()
  header_version, header_min_protoc = _protobuf_headers_version()
  if os.path.exists(stamp) and not force:
    with open(stamp) as f:
      state = json.load(f)
    sources = [os.path.join(paths.gen_dir, p[: -len(".proto")] + ".pb.cc") for p in state["generated"]]
    inputs = [os.path.abspath(__file__)] + [_pb2_path(p) for p in state["files"]]
    if (
      state["modules"] == list(PROTO_MODULES)
      and state["protoc"] == protoc_version
      and all(os.path.exists(s) for s in sources)
      and os.path.getmtime(stamp) >= _newest_mtime(inputs)
    ):
      return sources

  _log(f"generating protos with {protoc} ({protoc_version})")
  serialized, files = _descriptor_set(PROTO_MODULES)
  generated = [f for f in files if not f.startswith("google/protobuf/")]
  os.makedirs(paths.gen_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=paths.build_dir) as scratch:
    descriptor_set = os.path.join(scratch, "descriptors.pb")
    with open(descriptor_set, "wb") as f:
      f.write(serialized)
    out = os.path.join(scratch, "out")
    os.makedirs(out)
    _run([protoc, f"--descriptor_set_in={descriptor_set}", f"--cpp_out={out}", *generated], "protoc")
    for proto in generated:
      for suffix in (".pb.h", ".pb.cc"):
        name = proto[: -len(".proto")] + suffix
        _check_generated_version(os.path.join(out, name), header_version, header_min_protoc)
        _replace_if_changed(os.path.join(out, name), os.path.join(paths.gen_dir, name))
  with open(stamp + ".tmp", "w") as f:
    json.dump({"modules": list(PROTO_MODULES), "protoc": protoc_version, "files": files, "generated": generated}, f)
  os.replace(stamp + ".tmp", stamp)
  return [os.path.join(paths.gen_dir, p[: -len(".proto")] + ".pb.cc") for p in generated]


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
    raise BuildError(f"{path}: no protobuf version guard; was it generated by Debian's protoc?")
  if header_version < int(needs.group(1)) or int(made_by.group(1)) < header_min_protoc:
    raise BuildError(
      f"{path} was generated by protoc {made_by.group(1)} for headers >= {needs.group(1)}, but the system "
      f"headers are {header_version} (accepting protoc >= {header_min_protoc}): use Debian's protoc"
    )


def _replace_if_changed(source: str, target: str) -> None:
  """Moves source over target unless their bytes are equal, so unchanged files keep their mtime."""
  if os.path.exists(target):
    with open(source, "rb") as a, open(target, "rb") as b:
      if a.read() == b.read():
        os.remove(source)
        return
  os.makedirs(os.path.dirname(target), exist_ok=True)
  os.replace(source, target)


def _python_includes() -> list[str]:
  """pybind11, Python.h and numpy: the pip pybind11 when the venv has one, else Debian's pybind11-dev."""
  python_include = sysconfig.get_paths()["include"]
  if not os.path.exists(os.path.join(python_include, "Python.h")):
    raise BuildError(f"no Python.h in {python_include}: apt-get install {APT['Python.h']} (for {sys.executable})")
  try:
    import pybind11  # setup.py installs it; Debian's pybind11-dev otherwise.

    pybind11_include = pybind11.get_include()
  except ImportError:
    pybind11_include = "/usr/include"  # Searched anyway; naming it with -isystem would break #include_next.
  header = os.path.join(pybind11_include, "pybind11", "detail", "common.h")
  if not os.path.exists(header):
    raise BuildError(
      f"no pybind11 headers: pip install 'pybind11>=2.12' (make install does) or apt-get install {APT['pybind11']}"
    )
  import numpy

  with open(header) as f:
    version = tuple(int(v) for v in re.findall(r"^#define PYBIND11_VERSION_(?:MAJOR|MINOR) (\d+)", f.read(), re.M))
  if int(numpy.__version__.split(".")[0]) >= 2 and version < (2, 12):
    # pybind11 < 2.12 reads numpy 1's dtype layout: under numpy 2 every itemsize reads as 0.
    raise BuildError(
      f"pybind11 {'.'.join(map(str, version))} in {pybind11_include} predates numpy 2 support (2.12), and numpy is "
      f"{numpy.__version__}: pip install 'pybind11>=2.12' into {sys.prefix} (make install does)"
    )
  includes = [python_include, numpy.get_include()]
  if pybind11_include != "/usr/include":
    includes.insert(0, pybind11_include)
  return [flag for include in includes for flag in ("-isystem", include)]


def _depfile_inputs(depfile: str) -> list[str] | None:
  """The files a make-style depfile (g++ -MMD) lists as prerequisites, or None if unreadable."""
  try:
    with open(depfile) as f:
      text = f.read().replace("\\\n", " ")
  except OSError:
    return None
  _, _, prerequisites = text.partition(":")
  return [p.replace("\\ ", " ") for p in re.split(r"(?<!\\)\s+", prerequisites.strip()) if p]


def _up_to_date(output: str, record: str, command: list[str], inputs: Sequence[str]) -> bool:
  """True when `output` exists, was made by the command saved in `record` and is newer than every input."""
  try:
    with open(record) as f:
      if f.read() != shlex.join(command):
        return False
    mtime = os.path.getmtime(output)
  except OSError:
    return False
  return all(os.path.exists(i) and os.path.getmtime(i) <= mtime for i in inputs)


def _record_command(record: str, command: list[str]) -> None:
  with open(record, "w") as f:
    f.write(shlex.join(command))


def _compile_all(jobs: list[tuple[str, str, list[str]]], parallel: int) -> list[str]:
  """Compiles (source, object, flags) jobs that are out of date, `parallel` at a time; returns the objects."""
  cxx = os.environ.get("CXX") or _tool("g++")
  pending = []
  for source, obj, flags in jobs:
    command = [cxx, *flags, "-c", source, "-o", obj]
    depfile = obj[: -len(".o")] + ".d"  # The headers it included last time (g++ -MMD).
    inputs = _depfile_inputs(depfile)
    if inputs is None or not _up_to_date(obj, obj + ".cmd", command, [source, *inputs]):
      pending.append((source, obj, command, depfile))

  def compile_one(source: str, obj: str, command: list[str], depfile: str) -> None:
    os.makedirs(os.path.dirname(obj), exist_ok=True)
    _run([*command, "-MMD", "-MF", depfile], f"compiling {os.path.relpath(source, REPO)}")
    _record_command(obj + ".cmd", command)

  errors = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
    futures = {pool.submit(compile_one, *job): job[0] for job in pending}
    for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
      try:
        future.result()
        _log(f"[{n}/{len(pending)}] compiled {os.path.relpath(futures[future], REPO)}")
      except BuildError as e:
        errors.append(str(e))
  if errors:
    raise BuildError("\n".join(errors))
  return [obj for _, obj, _ in jobs]


def _link(output: str, record: str, objects: Sequence[str], flags: Sequence[str], libs: Sequence[str]) -> bool:
  """Links objects into output (written aside, then renamed over it); False if it was up to date."""
  cxx = os.environ.get("CXX") or _tool("g++")
  command = [cxx, *flags, "-o", output, *objects, *libs]
  if _up_to_date(output, record, command, objects):
    return False
  os.makedirs(os.path.dirname(output), exist_ok=True)
  # A running process may have the old file mapped: never overwrite it in place.
  scratch = f"{output}.tmp{os.getpid()}"
  _run([cxx, *flags, "-o", scratch, *objects, *libs], f"linking {output}")
  os.replace(scratch, output)
  _record_command(record, command)
  _log(f"linked {os.path.relpath(output, REPO)}")
  return True


def check_exports(module: str) -> list[str]:
  """The module's defined dynamic symbols (`nm -D --defined-only`); fails unless its init and only EXPORTS."""
  out = _run([_tool("nm"), "-D", "--defined-only", module], "nm")
  symbols = [line.split()[-1] for line in out.splitlines() if line.strip()]
  if f"PyInit_{MODULE_NAME}" not in symbols or not set(symbols) <= set(EXPORTS):
    raise BuildError(f"{module} exports {sorted(set(symbols) - set(EXPORTS))[:20]}: only {EXPORTS} may be")
  return symbols


def build(paths: Paths | None = None, parallel: int | None = None, force: bool = False) -> Paths:
  """Generates, compiles and links whatever is out of date; returns where the outputs are."""
  paths = paths or Paths()
  parallel = parallel or os.cpu_count() or 2
  module_sources = sorted(glob.glob(os.path.join(paths.repo, "serving", "native", "cc", "*.cc")))
  program_sources = {
    name: sorted(glob.glob(os.path.join(paths.repo, folder, "*.cc"))) for name, (folder, _) in PROGRAMS.items()
  }
  if not module_sources:
    raise BuildError(f"no C++ sources in {os.path.join(paths.repo, 'serving', 'native', 'cc')}")
  tf_include = os.path.join(_package_dir("tensorflow"), "include")
  if not os.path.exists(os.path.join(tf_include, "tensorflow", "c", "c_api.h")):
    raise BuildError(f"no tensorflow/c/c_api.h under {tf_include}: is the tensorflow wheel complete?")
  os.makedirs(paths.build_dir, exist_ok=True)
  proto_sources = generate_protos(paths, force)

  cflags = _pkg_config("--cflags")
  common = [*CXXFLAGS, *cflags, "-I", paths.gen_dir]
  # -idirafter: after the system headers, so TF's bundled protobuf 5 and absl never shadow them.
  module_flags = [*common, "-I", os.path.join(paths.repo, "serving", "native", "cc"), *_python_includes()]
  module_flags += ["-idirafter", tf_include]

  def obj(source: str, group: str) -> str:
    if source.startswith(paths.gen_dir):
      relative = os.path.relpath(source, paths.gen_dir)
    else:
      relative = os.path.relpath(source, paths.repo)
    return os.path.join(paths.obj_dir, group, relative[: -len(".cc")] + ".o")

  jobs = [(s, obj(s, "proto"), common) for s in proto_sources]
  jobs += [(s, obj(s, "module"), module_flags) for s in module_sources]
  for name, sources in program_sources.items():
    jobs += [(s, obj(s, name), common) for s in sources]
  if force:  # Forgetting the commands makes every step out of date.
    for record in [o + ".cmd" for _, o, _ in jobs] + glob.glob(os.path.join(paths.build_dir, "*.cmd")):
      if os.path.exists(record):
        os.remove(record)
  objects = _compile_all(jobs, parallel)
  proto_objects = objects[: len(proto_sources)]
  module_objects = objects[len(proto_sources) : len(proto_sources) + len(module_sources)]
  program_objects, start = {}, len(proto_sources) + len(module_sources)
  for name, sources in program_sources.items():
    program_objects[name], start = objects[start : start + len(sources)], start + len(sources)

  libs = [*_pkg_config("--libs"), "-lpthread", "-ldl"]
  version_script = os.path.join(paths.build_dir, "exports.map")
  with open(version_script + ".tmp", "w") as f:
    f.write(VERSION_SCRIPT)
  _replace_if_changed(version_script + ".tmp", version_script)
  link_flags = ["-shared", "-pthread", "-Wl,-Bsymbolic", f"-Wl,--version-script={version_script}", "-Wl,--as-needed"]
  module_record = os.path.join(paths.build_dir, MODULE_NAME + ".cmd")
  if _link(paths.module, module_record, module_objects + proto_objects, link_flags, libs) or force:
    check_exports(paths.module)
  for name, program in program_objects.items():
    if program:
      record = os.path.join(paths.build_dir, name + ".cmd")
      protos = proto_objects if PROGRAMS[name][1] else []
      _link(os.path.join(paths.programs_dir, name), record, program + protos, ["-pthread", "-Wl,--as-needed"], libs)
  return paths


def main(argv: list[str]) -> None:
  del argv
  paths = Paths(
    repo=FLAGS.repo or REPO, build_dir=FLAGS.build_dir, module=FLAGS.module, programs_dir=FLAGS.programs_dir
  )
  try:
    build(paths, FLAGS.jobs, FLAGS.force)
  except BuildError as e:
    print(f"[native build] error: {e}", file=sys.stderr)
    sys.exit(1)
  _log(f"up to date: {paths.module}")


if __name__ == "__main__":
  # Flags only when run as a program: bench/ imports this module for the programs' paths.
  from absl import app, flags

  FLAGS = flags.FLAGS
  flags.DEFINE_string("repo", None, "Checkout to build (default: the one holding this file).")
  flags.DEFINE_string("build_dir", "", "Generated code, objects and programs (default: <repo>/build/native).")
  flags.DEFINE_string("module", "", f"Extension to write (default: serving/native/{MODULE_NAME}<EXT_SUFFIX>).")
  flags.DEFINE_string("programs_dir", "", f"Where {', '.join(PROGRAMS)} go (default: --build_dir).")
  flags.DEFINE_integer("jobs", None, "Parallel compiles (default: one per core).")
  flags.DEFINE_bool("force", False, "Regenerate and rebuild everything.")
  app.run(main)
