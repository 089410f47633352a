# Two commands: `make demo` and `make test`. Both install into ./.venv first (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2

.PHONY: install demo test

install: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/python -c "import torch, nnunetv2, nilearn, ssl_nnunet; print('ssl_nnunet installed, torch', torch.__version__)"
	touch $(STAMP)

demo: install
	bash scripts/demo.sh

test: install
	bash scripts/run_tests.sh
