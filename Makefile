# The two commands of this project:
#   make up     set up (first time) and run the whole service with embedded defaults and demo models
#   make test   set up (first time) and run the whole test suite
# Setup needs only Python 3.11+: it creates .venv and installs the project into it, again
# only when pyproject.toml changes (the stamp file records the last install).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000
PYTEST_ARGS ?=
TORCH  ?= torch==2.13.0

.PHONY: up test install clean

up: $(STAMP)
	$(BIN)/gpujobs up --demo --port $(PORT)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
# --- ML stack: torch goes here, BEFORE anything that depends on it -------------------------
# torch==2.13.0 is a CPU wheel on this machine's disk; installing it first keeps other
# packages from pulling a multi-GB CUDA build. On a GPU machine, install the torch build you
# want first (e.g. `make TORCH=torch==2.9.1 install`).
	$(BIN)/pip install $(TORCH)
# -------------------------------------------------------------------------------------------
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) var test-artifacts .pytest_cache
