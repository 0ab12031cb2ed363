# Two commands on a fresh machine: `make run` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only hosts get TORCH_SPEC installed first, then everything else under constraints-cpu.txt
# (which pins the same torch). Here the CPU wheel is what pip finds; on an ordinary Linux host
# pip's default index serves the multi-GB CUDA build, so point it at PyTorch's CPU wheels:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
STAMP := $(VENV)/.installed
RUN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
ifeq ($(HAS_CUDA),1)
	@echo "[setup] CUDA host: keeping the host's CUDA torch (venv sees system site-packages)"
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
else
	@echo "[setup] CPU host: pinning $(TORCH_SPEC) (CPU build)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	PIP_CONSTRAINT=$(CURDIR)/constraints-cpu.txt $(PY) -m pip install -q -e '.[dev]'
endif
	@touch $(STAMP)

run: $(STAMP)
	RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 $(PY) launch/titans_2m.py --preset smoke $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# CPU benchmarks; benchmarks/*_gpu.py run through the device tool on a GPU machine.
bench: $(STAMP)
	for b in benchmarks/*.py; do case $$b in *_gpu.py) continue;; esac; \
	  echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache runs
