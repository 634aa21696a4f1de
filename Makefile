# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/jaxtl demo --out demo_out

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check jaxtl tests configs benchmarks
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check jaxtl tests configs benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
