# The README's two commands, `make demo` and `make test`, set everything up themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Downloads are cached inside the venv: a changed lock re-installs without re-downloading
# the 800 MB MindSpore wheel.
export PIP_CACHE_DIR := $(abspath $(VENV))/pip-cache
export SVD_BATCH_CACHE := $(abspath .cache)

# -qq: pip's errors still show; its notes (and a machine's own index warnings) do not.
PIP := --disable-pip-version-check -qq

REFERENCE := $(VENV)/torch-reference
REFERENCE_STAMP := $(REFERENCE)/.installed

.PHONY: setup reference browser demo test test-all test-full bench chaos docs screenshots lint format clean

setup: $(STAMP)

# torch diffusers, the reference the parity tests hold our frames to: test-only, in its own venv.
reference: $(REFERENCE_STAMP)

$(REFERENCE_STAMP): requirements-reference.lock | $(STAMP)
	@echo "setting up $(REFERENCE), the torch reference of the parity tests"
	@test -x $(REFERENCE)/bin/python || python3 -m venv $(REFERENCE)
	@$(REFERENCE)/bin/python -m pip install $(PIP) -r requirements-reference.lock
	@touch $(REFERENCE_STAMP)

$(STAMP): pyproject.toml requirements.lock
	@echo "setting up $(VENV) from requirements.lock (the first time downloads ~1 GB)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install $(PIP) -r requirements.lock
	@$(PY) -m pip install $(PIP) --no-deps -e .
	@touch $(STAMP)

demo: setup
	@$(PY) jobs/demo/make_inputs.py
	@test -f .cache/tiny-svd/model_index.json || $(VENV)/bin/svd-batch tiny-model .cache/tiny-svd
	@$(VENV)/bin/svd-batch run jobs/demo/job.yaml
	@$(VENV)/bin/svd-batch report out/demo

# The report test opens the page in a real headless Chromium, from Debian's packages.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The fast tier, before every change (at most 10 minutes; 7.7-9.9 measured); a test marked slow names the one here
# that covers its promise. Both tiers print their 15 slowest tests (addopts: --durations=15).
test: setup reference browser
	$(PY) -m pytest -q -m "not slow and not full"

# Everything but the full-size architecture: what CI runs (.ci/run).
test-all: setup reference browser
	$(PY) -m pytest -q -m "not full"

# The full-size architecture: builds the svd-xt preset once (9 GB of disk), then renders it.
test-full: setup reference
	$(PY) -m pytest -q -m full

bench: setup
	$(PY) -m bench.run

# Nights of faults against a real job (not part of make test): seeds 1-5, or SEED=N to replay one.
# Each writes chaos/results/<seed>.json; a violation fails.
chaos: setup
	$(PY) -m chaos.run $(if $(SEED),--seed $(SEED))

# The documentation as a site in site/, in strict mode (a broken link or anchor, or a page out of the nav, fails).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build

# The report's pictures in docs/img/, taken in headless Chromium from the demo's run (docs/screenshots.py).
screenshots: demo browser
	$(PY) docs/screenshots.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf .cache out site .pytest_cache
