# Two commands: `make demo` and `make test`. Both create .venv (if missing) and install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build installs from the local file; unpinned pulls CUDA.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	-bash tools/setup_toolchains.sh
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python tools/demo.py --out out

test: setup
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check slimgraph tests tools

bench: setup
	$(BIN)/python -m slimgraph.cli bench slimgraph/zoo/models.py:resnet18_factory --compare-untuned --tune-trials 800 --tune-time 840 --workdir out/bench_cli --json out/bench/bench_resnet18.json

clean:
	rm -rf out .pytest_cache
