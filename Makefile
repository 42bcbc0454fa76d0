# Every target sets itself up on a fresh machine: .venv, torch (the local CPU wheel), the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of this version lies on the machine's disk; a looser requirement would download a CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: venv lint test test-fast test-slurm demo demo-cluster bench bench-anchors clean

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
	$(BIN)/python -m pytest -q --durations=30  # where the time goes, in every CI log

test-fast: venv
	$(BIN)/python -m pytest -q tests/unit

# The real-scheduler tier (docs/schedulers.md): a real SLURM on this host (munge, slurmctld and two slurmd from
# Debian's packages, private to the test: its own key, ports and config) runs launcher/slurm/train.sbatch as users
# do. The packages are installed here when missing (root and apt); without them the tier skips, saying why.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
test-slurm: venv
	@if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q $(SLURM_PACKAGES) >/dev/null || \
	      { apt-get update -q >/dev/null && apt-get install -y -q $(SLURM_PACKAGES) >/dev/null; }; \
	  fi; \
	fi
	$(BIN)/python -m pytest -q -rs --durations=10 tests/slurm

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

# Other launchers to compare recovery with, in a venv of their own (never ftrain's dependencies): NVRx's
# ft_launcher. (DLRover 0.6.1's dlrover-run does not start under torch 2.13: its agent calls torchrun's
# SubprocessHandler without the numa_options argument torch 2.13 requires.)
ANCHORS := .venv-anchors
$(ANCHORS)/.installed: pyproject.toml
	test -x $(ANCHORS)/bin/python || $(PY) -m venv $(ANCHORS)
	$(ANCHORS)/bin/python -c "import torch" 2>/dev/null || $(ANCHORS)/bin/pip install -q "$(TORCH_PIN)"
	$(ANCHORS)/bin/pip install -q -e . "nvidia-resiliency-ext==0.4.1"
	touch $@

bench-anchors: venv $(ANCHORS)/.installed
	$(BIN)/python benchmarks/recovery.py --nproc 2 --repeat 3 --anchors $(ANCHORS)/bin

clean:
	rm -rf $(VENV) $(ANCHORS) build *.egg-info .pytest_cache
