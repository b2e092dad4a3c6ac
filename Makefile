# The two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: on machines with a local wheel cache this takes
# the cached build instead of downloading a new one. Override for another platform
# (aarch64: TORCH_SPEC='torch==2.9.1 torchvision==0.24.1').
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Every other package comes at the version constraints.txt pins (`make lock` rewrites it).
CONSTRAINTS := constraints.txt
DEMO_OUT ?= runs/demo
# `make test` runs the suite in this many pytest-xdist workers, a test file per worker at a time
# (much of the suite waits on servers, leases and child processes; each worker's torch uses one thread).
TEST_WORKERS ?= 2
# `make lock`: the tools it installs (uv resolves), and the aarch64 TORCH_SPEC the lock must also allow.
LOCK_TOOLS ?= uv==0.13.9 packaging==26.4
LOCK_CHECK_TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1

.PHONY: demo test test-paths bench install lint lock clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c $(CONSTRAINTS) $(TORCH_SPEC)
	$(BIN)/pip install -c $(CONSTRAINTS) -e '.[dev]'
	# img2dataset drags in the `dataclasses` backport, which shadows the standard
	# library inside Prefect's ephemeral API server and kills it (tests/test_install.py proves the server starts).
	$(BIN)/pip uninstall -y dataclasses
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/dalle demo --out $(DEMO_OUT)

# After the suite, the tests that assert a model learned run again on another kernel path
# (AVX2 kernels, MKL's compatible code path) and seed: a test that learns on one float
# trajectory only fails here, where it is written. `make test-paths` runs them on every path
# and five seeds. The paths are defined in tests/kernel_paths.py.
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile
	$(BIN)/python tests/kernel_paths.py --paths avx2 --seeds 1

test-paths: install
	$(BIN)/python tests/kernel_paths.py

# Every benchmark once, on an idle machine (about 40 minutes on 2 cores); one JSON line each.
# PEER_PYTHON=/tmp/peer/bin/python adds the peer (see benchmarks/peers/dalle_pytorch_runner.py).
bench: install
	bash benchmarks/run_all.sh

lint: install
	$(BIN)/ruff check dalle flows demo tests benchmarks tools

# Re-resolve the whole dependency set into constraints.txt with uv, installed into a
# throwaway virtual environment that is removed afterwards (needs PyPI; .venv is untouched).
# Current pins are kept where they still resolve; `make lock LOCK_ARGS=--upgrade` takes the newest.
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install --quiet $(LOCK_TOOLS); \
	"$$tmp/venv/bin/python" tools/lock.py --uv "$$tmp/venv/bin/uv" --output $(CONSTRAINTS) \
	  --torch-spec '$(TORCH_SPEC)' --check-torch-spec '$(LOCK_CHECK_TORCH_SPEC)' $(LOCK_ARGS)

clean:
	rm -rf $(VENV) runs
