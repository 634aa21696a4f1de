# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
comma := ,
VENV ?= .venv
PY := $(VENV)/bin/python
# With an NVIDIA GPU (nvidia-smi on PATH) the install adds JAX's CUDA wheels (the `cuda` extra), so `make demo`
# runs the same code on the GPU; `make demo EXTRAS=` forces the CPU-only install.
EXTRAS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,)
# pip byte-compiles what it installs on one core; compileall's workers use them all. On the 2-core AMD EPYC VM,
# pip install -e '.[test]' into a fresh venv: 108 s, or 34 s without compiling + 49 s of compileall -j 0 (the same
# .pyc files). As under pip, files only newer Pythons parse (PyTorch's py312_intrinsics.py) fail to compile: ignored.
PIP_INSTALL := -m pip install -q --no-compile
COMPILE = $(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true

.PHONY: demo test lint install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) $(PIP_INSTALL) -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	$(COMPILE)
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) $(PIP_INSTALL) -e '.[test$(if $(EXTRAS),$(comma)$(EXTRAS))]'
	$(COMPILE)
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
