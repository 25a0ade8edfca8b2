# make demo  - create .venv, install, run the demo (2D + digits flows, report in ./out)
# make test  - create .venv, install, run the whole test suite
# make docs  - the documentation site (mkdocs.yml), built --strict into ./site
# make dist  - the sdist and the wheel, in ./dist (.ci/wheel_check.sh installs and tests the wheel)
# On these CPU-only machines the pinned CPU build of torch is installed first; elsewhere
# `make TORCH="torch>=2.3"` (or any spec) picks another build.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PEERS  := $(VENV)/.peers
BROWSER := $(VENV)/.browser
DOCS    := $(VENV)/.docs
PYTEST_ARGS ?=

.PHONY: demo test install peers browser bench docs dist clean

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

# The documentation site's tools (the `docs` extra): mkdocs-material, mkdocstrings (python handler).
$(DOCS): $(STAMP)
	$(BIN)/pip install -q -e ".[docs]"
	touch $(DOCS)

# Strict: a broken link, a missing page or a docstring griffe rejects fails the build.
docs: $(DOCS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# sdist and wheel, built from the sdist (as pip would) in an isolated environment.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist

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
	rm -rf $(VENV) out bench_out .pytest_cache site dist build
