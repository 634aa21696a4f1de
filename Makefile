# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
comma := ,
VENV ?= .venv
PY := $(VENV)/bin/python
# With an NVIDIA GPU (nvidia-smi on PATH) the install adds JAX's CUDA wheels (the `cuda` extra), so `make demo`
# runs the same code on the GPU; `make demo EXTRAS=` forces the CPU-only install.
EXTRAS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,)
# pip installs without byte-compiling every file it unpacks (PyTorch's alone are thousands): Python compiles the
# modules a process imports, once, when it first imports them, which needs PYTHONDONTWRITEBYTECODE unset (some
# machines set it; each `jaxtl` process the tests start would compile the same modules again). On the 2-core AMD
# EPYC VM: `pip install -e '.[test]'` 108 -> 43 s.
PIP_INSTALL := -m pip install -q --no-compile
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test lint install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) $(PIP_INSTALL) -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) $(PIP_INSTALL) -e '.[test$(if $(EXTRAS),$(comma)$(EXTRAS))]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/jaxtl demo --out demo_out

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check jaxtl tests configs benchmarks
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check jaxtl tests configs benchmarks

clean:
	rm -rf $(VENV) demo_out demo_ci .pytest_cache
