# One way to set up, test and benchmark, locally and in CI.
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build (README.md, "Install and test").
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Two pytest-xdist workers; the tests run in a random order (pytest-randomly, its seed in the header). PYTEST_ARGS
# replaces "-n 2": PYTEST_ARGS="-p no:randomly" (file order, one process), PYTEST_ARGS="-n 2 --randomly-seed=N".
PYTEST_ARGS ?= -n 2
DEMO_ARGS ?=

.PHONY: install test demo bench lint clean

$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "torch==$(TORCH_VERSION)"
	touch $@

# Two distributions, both editable: lfvila-kernels (kernels/, torch + triton only) first, then lfvila, which depends on it.
$(VENV)/.installed: setup.py pyproject.toml kernels/pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -e ./kernels
	$(PY) -m pip install -e ".[test]"
	# timm and open_clip for the drop-in tests, without their dependencies: both require torchvision, whose only
	# release for torch 2.13 is a CUDA build that does not load next to the CPU torch (and an unpinned one replaces
	# torch). timm's Swin and open_clip's loss.py need only torch (see tests/kernels/test_patch.py); MONAI (SwinUNETR,
	# tests/kernels/test_patch_monai.py) needs torch and numpy.
	$(PY) -m pip install --no-deps "timm==1.0.31" "open_clip_torch==3.3.0" "monai==1.6.1"
	touch $@

# The demo needs the package and its "demo" extra only: no DALI, pytest, ruff, timm or open_clip (what `make test`
# adds on top).
$(VENV)/.installed-demo: setup.py pyproject.toml kernels/pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -e ./kernels
	$(PY) -m pip install -e ".[demo]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job on the embedded synthetic dataset: generate it, pre-train lfvila-tiny (stage 1), fine-tune for
# retrieval, evaluate, write runs/demo/report.md (offline; CPU or GPU).
demo: $(VENV)/.installed-demo
	$(PY) -m train.demo --out runs/demo --data data/synthetic $(DEMO_ARGS)

# Every benchmark suite (attention shape sets, contrastive, decode, train step) at this machine's sizes: CSVs, markdown
# and plots in benchmarks/results/_scratch/; BENCH_ARGS="--suite attention --shapes long-form --compare LABEL" etc.
BENCH_LABEL ?= local
BENCH_ARGS ?= --suite all
bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.run --label $(BENCH_LABEL) --out-dir benchmarks/results/_scratch $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) *.egg-info kernels/*.egg-info .pytest_cache .ruff_cache
