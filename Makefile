# Every target sets itself up on a fresh machine: .venv, torch (the local CPU wheel), the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of this version lies on the machine's disk; a looser requirement would download a CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: venv lint test test-fast demo demo-cluster bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

# The linters live in their own extra: a user's `pip install ftrain` never pulls them.
LINT_STAMP := $(VENV)/.lint-installed

$(LINT_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e ".[lint]"
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(BIN)/ruff check ftrain
	$(BIN)/mypy

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q tests/unit

demo: venv
	$(BIN)/python examples/demo.py

# Two simulated nodes on this host: one is SIGKILLed whole, the other goes on, the first rejoins; exactly-once audit.
demo-cluster: venv
	$(BIN)/python examples/demo_cluster.py

bench: venv
	$(BIN)/python benchmarks/checksum.py
	$(BIN)/python benchmarks/checkpoint.py
	$(BIN)/python benchmarks/trainable_only.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/elastic.py
	$(BIN)/python benchmarks/nodelocal.py
	$(BIN)/python benchmarks/remote.py
	$(BIN)/python benchmarks/sharded.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
