# The two commands: `make run` starts the whole service locally, `make test` checks everything.
# Both create .venv and install into it on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that this machine keeps on disk; on a CUDA host: make run TORCH=torch
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test chaos soak install tools clean

run: install
	$(BIN)/sdserve dev --host $(HOST) --port $(PORT)

# Three test processes (pytest-xdist) on CI's two cores: many tests wait on processes and
# sockets, not the CPU. One torch thread each (and in every worker process they start): torch's
# threads spin while they wait, and two test processes plus their workers, each with a thread a
# core, spent a third of the cores spinning (the fault tests took 5:41 with two threads a
# process, 3:45 with one). Measured on two cores: 11:12 with -n 2 and two threads, 10:17 with
# one, 7:35 with -n 3 and one.
test: install tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	OMP_NUM_THREADS=1 $(BIN)/pytest -n 3

# The fault tests alone (make test runs them too); both print the faults table at the end.
chaos: install
	$(BIN)/pytest tests/test_chaos.py

# The long soak (make test runs a short one): thousands of jobs while workers, an API process
# and Redis are killed and restarted; prints its report at the end (docs/reliability.md).
SOAK_JOBS ?= 3000
soak: install
	SOAK_JOBS=$(SOAK_JOBS) SOAK_CLIENTS=32 SOAK_FAULT_EVERY_S=12 $(BIN)/pytest -p no:xdist --timeout 3600 tests/test_soak.py

install: $(VENV)/.installed

# Debian tools the tests use: promtool checks the alert rules, kubectl renders the kustomize
# manifests, Chromium runs the playground, curl the API docs' examples. Installed once, when
# missing.
tools:
	@missing=""; command -v promtool >/dev/null || missing="prometheus"; \
	command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	[ -z "$$missing" ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } || \
	{ echo "make test needs: apt-get install $$missing"; exit 1; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[api,worker,dev]'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
