# Two set-up commands on a fresh machine: `make demo` and `make test`. Both create the virtual
# environment with the pinned dependencies first (Python 3.10-3.12 as python3).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install clean bazel-test

# Root installs with apt-get directly, anyone else through sudo.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# `apt-get install` of the Debian packages in $(1) that are missing; apt-get update first, only then.
define apt_install
missing=$$(for p in $(1); do \
  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -qx 'install ok installed' || echo $$p; done); \
if [ -n "$$missing" ]; then \
  echo "Installing Debian packages:" $$missing; \
  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
fi
endef

# What the native data plane builds with (serving/native/README.md): g++, Debian's protoc and the
# libprotobuf 3.21 / libgrpc++ 1.51 it matches; python3-dev only if the Python has no headers.
PYTHON_INCLUDE = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NATIVE_APT = g++ pkg-config protobuf-compiler libprotobuf-dev libgrpc++-dev \
  $(if $(wildcard $(PYTHON_INCLUDE)/Python.h),,python3-dev)
NATIVE_SOURCES := $(wildcard serving/native/build*.py) $(wildcard serving/native/cc/* bench/native_*/*)

install: $(VENV)/.installed

# The pinned Python packages, and this checkout installed editable.
$(VENV)/.pip-installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The native module and the benchmarks' native programs (serving/native/build.py, incremental),
# redone when their sources change.
$(VENV)/.installed: $(VENV)/.pip-installed $(NATIVE_SOURCES)
	@$(call apt_install,$(NATIVE_APT))
	$(BIN)/python -m serving.native.build
	touch $@

demo: install
	$(BIN)/python tools/demo.py --output_dir=demo_output

# -ra lists every skipped test with its reason (e.g. no MovieLens data outside CI).
# Run serially, the suite kept about one core busy: much of it waits on servers and subprocesses.
# TEST_WORKERS pytest-xdist workers take whole files each (--dist loadfile), so a file's module
# fixtures (servers, exports) are still built once; each worker builds the session fixtures it needs.
# More workers than cores, or than memory allows (~2 GB each), buys nothing; 0 runs in this process.
# A worker that crashes ends the run, named: xdist's replacement workers lose their file
# assignments under --dist loadfile, and the run then hung.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --max-worker-restart=0 tests

# One style, configured in ruff.toml: lint and formatting (`ruff format .` applies it).
lint: $(VENV)/.pip-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The same suite through Bazel (Debian's Bazel 4.2, offline; see README "Building with Bazel").
# Installs Bazel and Debian's rules_java only when missing (sudo unless already root).
bazel-test: install
	@if ! command -v bazel >/dev/null 2>&1 || [ ! -d /usr/share/bazel/rules/java ]; then \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y bazel-bootstrap bazel-rules-java; \
	fi
	bazel test //tests/...

clean:
	rm -rf demo_output $(VENV) *.egg-info .pytest_cache build/native serving/native/_fgr_native*.so
