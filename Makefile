# make demo  - create .venv, install, run the demo (2D + digits flows, report in ./out)
# make test  - create .venv, install, run the whole test suite
# On these CPU-only machines the pinned CPU build of torch is installed first; elsewhere
# `make TORCH="torch>=2.3"` (or any spec) picks another build.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PEERS  := $(VENV)/.peers
BROWSER := $(VENV)/.browser
PYTEST_ARGS ?=

.PHONY: demo test install peers browser bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)" || $(BIN)/pip install -q "torch>=2.3"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Peers (diffusers, torchdiffeq, flow_matching, torchcfm, rectified-flow) for the interop tests and
# the side-by-side benchmarks; best effort: without them those tests skip with a reason.
$(PEERS): $(STAMP) requirements-peers.txt
	$(BIN)/pip install -q --no-deps -r requirements-peers.txt && touch $(PEERS) || echo "peers not installed: interop tests will skip"

peers: $(PEERS)

# Playwright's Python driver for the headless-browser test of the streaming page; it drives the
# system Chromium (/usr/bin/chromium, Debian's `chromium` package) and downloads no browser.
# Best effort: without it (or without Chromium) that one test skips with a reason.
$(BROWSER): $(STAMP)
	$(BIN)/pip install -q "playwright>=1.40" && touch $(BROWSER) || echo "playwright not installed: the browser test will skip"

browser: $(BROWSER)

demo: $(STAMP)
	$(BIN)/straightflow demo --out out

test: $(STAMP) $(PEERS) $(BROWSER)
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

# The suites live in benchmarks/ beside the library (not installed): `straightflow bench` finds them
# from this checkout.
bench: $(STAMP) $(PEERS)
	$(BIN)/straightflow bench train --out bench_out
	$(BIN)/straightflow bench solvers --out bench_out

clean:
	rm -rf $(VENV) out bench_out .pytest_cache
