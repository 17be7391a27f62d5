# Two set-up commands on a fresh machine: `make demo` and `make test`. Both create the virtual
# environment with the pinned dependencies first (Python 3.10-3.12 as python3).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install clean bazel-test

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/python tools/demo.py --output_dir=demo_output

# -ra lists every skipped test with its reason (e.g. no MovieLens data outside CI).
test: install
	$(BIN)/python -m pytest -q -ra tests

# One style, configured in ruff.toml: lint and formatting (`ruff format .` applies it).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The same suite through Bazel (Debian's Bazel 4.2, offline; see README "Building with Bazel").
# Installs Bazel and Debian's rules_java only when missing (sudo unless already root).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
bazel-test: install
	@if ! command -v bazel >/dev/null 2>&1 || [ ! -d /usr/share/bazel/rules/java ]; then \
	  $(SUDO) apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y bazel-bootstrap bazel-rules-java; \
	fi
	bazel test //tests/...

clean:
	rm -rf demo_output $(VENV) *.egg-info .pytest_cache
