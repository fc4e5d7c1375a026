# dalle3_fast: `make install`, `make test`, `make demo`, `make bench`, `make gpu-check`.
#
# Where it installs: inside an active virtual environment (VIRTUAL_ENV set) its python;
# with PYTHON=... that interpreter; otherwise a project venv in .venv, created from python3
# on first use. A fresh Debian's system python refuses `pip install` (PEP 668), so the
# default never installs into it.
VENV ?= .venv
ifdef PYTHON
  PY := $(PYTHON)
else ifdef VIRTUAL_ENV
  PY := $(VIRTUAL_ENV)/bin/python
else
  PY := $(VENV)/bin/python
endif
PIP := $(PY) -m pip

.PHONY: install test demo bench gpu-check clean

$(VENV)/bin/python:
	python3 -m venv $(VENV) || { echo "make: could not create $(VENV): install the venv module (Debian: apt-get install python3-venv) or pass PYTHON=/path/to/python" >&2; exit 2; }

# torch is installed only when none is importable (then pinned to the CPU build that
# lies on this class of machine); a user's own torch, CUDA or not, is kept.
install: $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/bin/python)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install "setuptools>=64" wheel ninja   # the build tools --no-build-isolation expects to find
	$(PIP) install -e ".[serve,export,test]" --no-build-isolation
	@$(PY) -c "import dalle3_fast.ops as o; print('dalle3_fast backends live:', ', '.join(o.available_backends()))"

test: install
	$(PY) -m pytest -q -x --durations=15

demo: install
	$(PY) -m dalle3_fast.sample --prompt "a red circle above a blue square" --seed 0 --out out/demo.png
	@echo "make demo: the image is $(CURDIR)/out/demo.png"

bench: install
	$(PY) benchmarks/run.py --suite ops

# On a GPU machine: build for its arch, test, sanitize and time, and on an AVX-512 host CPU time the CPU ops
# (benchmarks/gpu_check.py; README "GPU check").
# It runs from the tree without installing; with no project venv it uses python3 (the CUDA torch there).
# Flags through GPU_CHECK_ARGS, e.g. make gpu-check GPU_CHECK_ARGS="--skip-build --stages bench".
gpu-check:
	$(if $(PYTHON),$(PYTHON),$(if $(wildcard $(PY)),$(PY),python3)) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build dalle3_fast/_C*.so *.egg-info
