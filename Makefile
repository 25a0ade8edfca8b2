# make demo  - create .venv, install, run the demo (2D + digits flows, report in ./out)
# make test  - create .venv, install, run the whole test suite
# On these CPU-only machines the pinned CPU build of torch is installed first; elsewhere
# `make TORCH="torch>=2.3"` (or any spec) picks another build.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)" || $(BIN)/pip install -q "torch>=2.3"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/straightflow demo --out out

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/straightflow bench train --out bench_out

clean:
	rm -rf $(VENV) out bench_out .pytest_cache
