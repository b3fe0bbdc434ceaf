# make setup      create .venv (pinned requirements) and node_modules (the site's own MathJax,
#                 RequireJS and widget manager, pinned in package-lock.json); redone when stale
# make book       set up, then build the site into _build/html (it works offline)
# make test       set up, then run every test: lint, then in one pytest run on $(JOBS) workers the
#                 unit tests, nbval over every notebook, the book build with -W and the browser
#                 check; prints the slowest tests
# make notebooks  re-execute the chapter and solution notebooks in place (fresh kernel, widget state
#                 saved); NB=chapters/NN_name.ipynb for one (also for make nbval)
# make labs       regenerate labs/ from solutions/
PYTHON ?= python3
# One floating-point code path on every x86-64 CPU, so that nbval's comparison of stored and fresh
# outputs does not depend on the machine: PyTorch's own kernels, MKL's GEMMs and oneDNN (which
# some float32 ops use too) take their AVX2 branch (an AVX-512 CPU otherwise rounds differently),
# with a fixed two threads that MKL and OpenMP may not reduce under load. bfloat16 matmuls are
# then emulated (slow, but the same everywhere).
export ATEN_CPU_CAPABILITY ?= avx2
export MKL_CBWR ?= AVX2
export ONEDNN_MAX_CPU_ISA ?= AVX2
export OMP_NUM_THREADS ?= 2
export MKL_DYNAMIC ?= FALSE
export OMP_DYNAMIC ?= FALSE
JOBS ?= 2
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.package-lock.json
PY_DIRS := $(wildcard utils tests scripts benchmarks _ext)
# Longest first, so that the slowest notebook does not start last: chapters in reverse order.
NOTEBOOKS := $(shell ls -r chapters/*.ipynb) $(wildcard solutions/*.ipynb)
NBVAL := --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg
# Whole files (a notebook's cells, a test module) stay on one worker, in the order given.
PARALLEL := -n $(JOBS) --dist loadfile --no-loadscope-reorder -p no:cacheprovider

.PHONY: setup book test lint unit nbval notebooks labs clean

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts --loglevel=error

setup: $(STAMP) $(NODE_STAMP)

book: setup
	$(BIN)/jupyter-book build . -W --keep-going

lint: $(STAMP)
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/python scripts/sync_setup_cell.py --check

unit: setup
	$(BIN)/pytest tests $(PARALLEL) --durations=15

nbval: $(STAMP)
	$(BIN)/pytest $(NBVAL) $(or $(NB),$(NOTEBOOKS)) $(PARALLEL) --durations=15

test: lint setup
	$(BIN)/pytest $(NBVAL) $(NOTEBOOKS) tests $(PARALLEL) --durations=15

notebooks: $(STAMP)
	$(BIN)/python scripts/execute_notebooks.py $(NB)

labs: $(STAMP)
	$(BIN)/python scripts/make_labs.py

clean:
	rm -rf _build .pytest_cache
