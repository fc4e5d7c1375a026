# dalle3_fast: `make install`, `make test`, `make demo`, `make bench`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test demo bench clean

# torch is installed only when none is importable (then pinned to the CPU build that
# lies on this class of machine); a user's own torch, CUDA or not, is kept.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install "setuptools>=64" wheel ninja   # the build tools --no-build-isolation expects to find
	$(PIP) install -e ".[serve,export,test]" --no-build-isolation
	@$(PYTHON) -c "import dalle3_fast.ops as o; print('dalle3_fast backends live:', ', '.join(o.available_backends()))"

test: install
	$(PYTHON) -m pytest -q -x --durations=15

demo: install
	$(PYTHON) -m dalle3_fast.sample --prompt "a red circle above a blue square" --seed 0 --out out/demo.png

bench: install
	$(PYTHON) benchmarks/run.py --suite ops

clean:
	rm -rf build dalle3_fast/_C*.so *.egg-info
