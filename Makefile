# The two commands of the README: `make serve` and `make test`. Both create the
# virtual environment in .venv on first use (Python 3.11+ is all they need).
# `make serve` installs what serving needs (the client and server distributions);
# every other target adds the dev tools. The stamps keep a second run from reinstalling.
#
# Both distributions are always installed in ONE pip command: the server requires
# `callcredit`, and pip then takes it from ./client instead of looking it up on an index.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SERVE_STAMP := $(VENV)/.serve-stamp
DEV_STAMP := $(VENV)/.dev-stamp

.PHONY: serve test lint format protos bench compiled pure

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(SERVE_STAMP): pyproject.toml client/pyproject.toml | $(VENV)/pyvenv.cfg
	$(BIN)/python -m pip install -q -e ./client -e .
	touch $@

# The dev tools on top. What it installs serves too, so it makes the serve stamp as well.
$(DEV_STAMP): pyproject.toml client/pyproject.toml | $(VENV)/pyvenv.cfg
	$(BIN)/python -m pip install -q -e ./client -e '.[dev]'
	touch $(SERVE_STAMP) $@

# The core (and the journal's codec) compiled by mypyc, in place
# (scripts/build_compiled.py): rebuilt when one of their sources changed since.
# `make pure` removes it; the server logs which core it runs.
COMPILED_STAMP := server/callcredit_server/core/.compiled-stamp
$(COMPILED_STAMP): $(wildcard server/callcredit_server/core/*.py) server/callcredit_server/codec.py | $(DEV_STAMP)
	$(BIN)/python scripts/build_compiled.py
	touch $@

compiled: $(COMPILED_STAMP)

pure: | $(DEV_STAMP)
	$(BIN)/python scripts/build_compiled.py --clean
	rm -f $(COMPILED_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/callcredit-server

test: $(DEV_STAMP)
	$(BIN)/pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(DEV_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

protos: $(DEV_STAMP)
	$(BIN)/python scripts/gen_protos.py

bench: $(DEV_STAMP)
	$(BIN)/python scripts/bench_control.py
