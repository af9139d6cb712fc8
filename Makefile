# Quick start on a fresh machine: `make bench` and `make test` (each runs `make setup` first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel by default; e.g. `make setup TORCH_SPEC='torch==2.11.0'` for another build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,triton,plot,examples,hf
# The oldest Triton the package supports, beside the venv's (not on its path): the suite compiles the kernels' covering
# set with it too, so a feature of a newer Triton cannot slip in (it once did: fdiv(approx=)).
TRITON_MIN_SPEC ?= triton==3.6.0
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: setup test bench lint gpu-build-check dist-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py cbkernels/_build.py Makefile $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip "setuptools>=64" wheel ninja
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	rm -rf $(VENV)/triton-min && $(PY) -m pip install -q --no-deps --target $(VENV)/triton-min "$(TRITON_MIN_SPEC)"
	touch $@

test: setup
	$(PY) -m pytest tests
	$(MAKE) --no-print-directory dist-check

# The sdist and a wheel, each installed into a fresh venv holding only torch and numpy, smoke-tested outside the tree.
dist-check: setup
	TORCH_SPEC='$(TORCH_SPEC)' $(PY) tools/dist_check.py

bench: setup
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

gpu-build-check: setup
	$(PY) tools/gpu_build_check.py
	if command -v nvcc >/dev/null || test -x "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; then $(PY) tools/nvcc_build_check.py; fi

clean:
	rm -rf build dist *.egg-info cbkernels/*.so cbkernels/_build_info.py $(VENV)/.installed
