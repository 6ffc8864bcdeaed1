# Two entry points do all the set-up: `make run` (the notebook pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= quick
STAMP := $(VENV)/.advkit-installed

.PHONY: run test fast-test lint browser-test notebooks lab clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	# torchattacks is only a cross-check; its metadata pins requests~=2.25 (breaks jupyterlab): no deps.
	$(BIN)/pip install -q --no-deps torchattacks==3.5.1
	# PyHessian: the Hessian speed/accuracy reference of benchmarks/ (pure Python; numpy and torch only).
	$(BIN)/pip install -q --no-deps pyhessian==0.1
	touch $(STAMP)

## run the notebook pipeline: runs/$(PROFILE)/, its figures in runs/$(PROFILE)/figures/ (committed files untouched)
run: $(STAMP)
	$(BIN)/python -m advkit run --profile $(PROFILE)

# pytest-xdist: a worker per core (at most 4; the tests run torch on one thread each), a file at a time. The
# notebooks are one pipeline, so tests/conftest.py sends them to one worker, in order; they go first, the
# longest piece of work.
XDIST := -n auto --maxprocesses 4 --dist loadfile

## unit tests and nbval notebook regression tests
test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) --nbval --nbval-sanitize-with nbval_sanitize.cfg notebooks tests

## ruff over the repository (pyproject.toml's [tool.ruff]: pycodestyle, pyflakes, import order, lines <= 120)
lint: $(STAMP)
	$(BIN)/ruff check .

## the fast tier while working: unit tests under a second each (no notebooks, no CIFAR-10, no subprocess runs)
fast-test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" tests

## the real-browser slicer test alone (installs Debian's chromium and playwright when missing)
browser-test: $(STAMP)
	.ci/browser-setup
	$(BIN)/python -m pytest tests/plots/test_slicer_browser.py

## re-execute the notebooks in place (quick profile, fresh run directory) to refresh their outputs and figures/
notebooks: $(STAMP)
	ADVKIT_RUNS_DIR=$$(mktemp -d) $(BIN)/python -m advkit refresh

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf runs/quick
