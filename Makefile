# The two commands a user types on a fresh machine are `make book` and `make test`;
# both run `setup` first. See README.md.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. GPU users: `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128`
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
PIP_QUIET ?= -q
STAMP := $(VENV)/.setup-stamp
PRESET ?= default

.PHONY: setup test book bench lint clean help

help:
	@echo "make setup  - create $(VENV) and install the package with test and book extras"
	@echo "make test   - set up, then run the test suite (includes the quick pipeline, book and browser test)"
	@echo "make book   - set up, run the '$(PRESET)' study preset and build the book into _build/html"
	@echo "make bench  - set up, then run the benchmarks and print their figures"
	@echo "make lint   - ruff"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install $(PIP_QUIET) "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install $(PIP_QUIET) -e ".[test,book]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	$(BIN)/python -c "import brainage_core, nilearn, captum, papermill, jupyter_book, bids"
	@command -v npm >/dev/null || echo "warning: npm not found: the book is built without its NiiVue viewer (apt-get install -y npm)"
	@touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

book: setup
	$(BIN)/brainage-study run --preset $(PRESET)
	$(BIN)/brainage-study book --preset $(PRESET)

bench: setup
	$(BIN)/brainage-study bench all

lint: setup
	$(BIN)/ruff check brainage_core tests

clean:
	rm -rf _build .pytest_cache
