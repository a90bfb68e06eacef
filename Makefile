# Set-up and entry points. `make demo` / `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Exact versions known to work together on Python 3.11 (pyproject.toml only sets lower bounds).
PINS := torch==2.14.1 torchvision==0.29.1 lightning==2.6.6 torchmetrics==1.9.0 \
	pytest==9.2.0 ruff==0.17.6 scikit-learn==1.9.1 matplotlib==3.11.2 torch-pruning==1.6.1 \
	onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0 'jsonargparse[signatures]==4.53.0'
# The documentation tools (`make docs` only; pyproject.toml's `docs` extra has the lower bounds).
DOC_PINS := mkdocs==1.6.1 mkdocs-material==9.8.2 mkdocstrings==1.0.8 mkdocstrings-python==2.0.11 \
	griffelib==2.4.1 mkdocs-autorefs==1.4.5 pymdown-extensions==13.1.2

.PHONY: venv demo test lint docs

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q $(PINS)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) benchmarks/demo_digits.py

test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

$(VENV)/.docs-installed: $(VENV)/.installed Makefile
	$(PY) -m pip install -q $(DOC_PINS)
	touch $@

# The documentation site (mkdocs.yml): built into site/ in strict mode, so a broken link, a
# missing page or an API reference to a removed name fails the build.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
