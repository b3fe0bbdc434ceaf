# make book       set up .venv (when missing or stale) and build the site into _build/html
# make test       set up .venv and run every test: lint, unit tests, notebooks (nbval), book build, browser
# make notebooks  re-execute the chapter and solution notebooks in place (fresh kernel, widget state saved)
# make labs       regenerate labs/ from solutions/
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PY_DIRS := $(wildcard utils tests scripts benchmarks _ext)
NOTEBOOK_DIRS := $(wildcard chapters solutions)

.PHONY: book test lint unit nbval notebooks labs clean

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . -W --keep-going

lint: $(STAMP)
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/python scripts/sync_setup_cell.py --check

unit: $(STAMP)
	$(BIN)/pytest tests

nbval: $(STAMP)
	$(BIN)/pytest --nbval $(NOTEBOOK_DIRS) --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

test: lint unit nbval

notebooks: $(STAMP)
	$(BIN)/python scripts/execute_notebooks.py

labs: $(STAMP)
	$(BIN)/python scripts/make_labs.py

clean:
	rm -rf _build .pytest_cache
