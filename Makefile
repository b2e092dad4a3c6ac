# The two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: on machines with a local wheel cache this takes
# the cached build instead of downloading a new one. Override for another platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= runs/demo

.PHONY: demo test install lint clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[dev]'
	# img2dataset drags in the `dataclasses` backport, which shadows the standard
	# library inside Prefect's ephemeral API server and kills it (see DESIGN.md).
	$(BIN)/pip uninstall -y dataclasses
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/dalle demo --out $(DEMO_OUT) --config configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check dalle flows tests benchmarks

clean:
	rm -rf $(VENV) runs
