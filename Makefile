# mlsteps developer entry points. `make demo` and `make test` work on a fresh machine with only
# Python: they create .venv, install torch first (so pip never pulls a multi-GB CUDA build as a
# dependency), then the package with its dev extras.
PYTHON ?= python3
VENV ?= .venv
# Pick another torch build with e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp

.PHONY: install demo test lint fmt bench soak examples clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	# compat mode: a plain .pth path entry, no import-hook finder (keeps `mlsteps --help` fast)
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/mlsteps run configs/quickstart.yaml
	$(VENV)/bin/mlsteps report runs/quickstart
	$(VENV)/bin/mlsteps run configs/alignment.yaml
	$(VENV)/bin/mlsteps report runs/alignment

test: install
	$(VENV)/bin/pytest -q -m "not slow"

soak: install
	$(VENV)/bin/pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check mlsteps tests bench
	$(VENV)/bin/ruff format --check mlsteps tests bench
	$(VENV)/bin/mypy mlsteps

fmt: install
	$(VENV)/bin/ruff check --fix mlsteps tests bench
	$(VENV)/bin/ruff format mlsteps tests bench

bench: install
	$(PY) bench/run_all.py

examples: install
	$(PY) -m pytest -q tests/integration/test_examples.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
