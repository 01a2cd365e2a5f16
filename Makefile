# `make test` and `make demo` work on a fresh clone: both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo reproduce lint clean

venv: $(STAMP)

# torch is installed first and alone so that the pinned CPU/CUDA build is chosen before
# any other package could pull an unpinned one.
# The clone itself is installed editable last (its dependencies are the pins above): .venv/bin/memwatch.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest

demo: venv
	$(PY) scripts/demo.py

# The paper's findings in miniature on phantoms (26.7 min measured on a 2-core CPU): docs/RESULTS.md, docs/figures/
reproduce: venv
	$(PY) scripts/reproduce.py

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
