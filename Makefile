# One way to set up, test and benchmark, locally and in CI.
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build (see ENVIRONMENT.md).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install test bench lint clean

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.bench_attention --shapes lfvila --label local --out benchmarks/results/_scratch/attention.csv
	$(PY) -m benchmarks.bench_contrastive --label local --out benchmarks/results/_scratch/contrastive.csv

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
