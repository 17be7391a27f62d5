# Two set-up commands on a fresh machine: `make demo` and `make test`. Both create the virtual
# environment with the pinned dependencies first (Python 3.10-3.12 as python3).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/python tools/demo.py --output_dir=demo_output

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf demo_output $(VENV) *.egg-info .pytest_cache
