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

.PHONY: test demo install clean-venv

test: $(STAMP)
	$(VENV_PYTHON) -m pytest -q tests

demo: $(STAMP)
	$(VENV_PYTHON) examples/demo.py

install: $(STAMP)

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -c "import torch" 2>/dev/null || $(VENV_PYTHON) -m pip install "$(TORCH_SPEC)"
	$(VENV_PYTHON) -m pip install -e '.[dev]'
	touch $@

clean-venv:
	rm -rf $(VENV)
