# The two README commands: `make demo` (the main job) and `make test` (the suite CI runs).
# Both create .venv with the checkout's Python (3.12, selected by .python-version) on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo compare test test-gpu bench-cpu clean

$(STAMP): setup.py requirements/constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), \
		f"nsa-jax needs Python >= 3.12 (JAX 0.11.2); {sys.executable} is {sys.version.split()[0]}"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test,experiments]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.train --config experiments/configs/demo.py --workdir out/demo

compare: $(STAMP)
	$(PY) -m experiments.compare --config experiments/configs/compare_cpu.py

# The CPU suite compiles hundreds of small programs, for which LLVM's optimisation passes cost
# more than they save (2026-12-04: the interpreted-kernel and XLA tests ~30% faster at level 0).
test: $(STAMP)
	XLA_FLAGS="--xla_backend_optimization_level=0 $$XLA_FLAGS" $(PY) -m pytest -q -n 2 tests

# On a GPU machine (already has JAX with CUDA): the GPU-marked tests at real sizes. Only the files
# that hold them, so the machine needs no experiment packages (ml_collections, orbax).
# GPU_WORKERS > 1 shares the GPU between pytest-xdist processes (memory taken on demand, not
# preallocated): most of a GPU test's time is compiling on the host. 2026-12-04, H200 (16 host
# cores), GPU_WORKERS=16, 599 tests in about 15 minutes, more than one 10-minute device call, so
# split with -k: test_pallas_gpu + test_decode + test_properties -k "not every_short_length"
# (83 tests, 5.4 min), then test_properties -k "every_short_length and float32" (258, 6.7 min),
# then "... and bfloat16" (258, 2.5 min on a warm compilation cache).
# More workers risk running out of GPU memory: on an 80 GB H100 at 12 workers three Mosaic
# shape tests did (2026-12-05; the 64k cases' XLA references are large), and 16 of 81 tests at 12
# workers, some at 6 (2026-12-06): each process keeps its peak in JAX's pooling allocator. With
# the platform allocator (memory freed when a buffer dies) the same tests all passed at 5.
# XLA's GEMM autotuning is off for the tests (the reference computations need no tuned
# algorithms; benchmarks keep it).
GPU_TESTS := tests/test_pallas_gpu.py tests/test_decode.py tests/test_properties.py
GPU_WORKERS ?= 4
test-gpu:
	PYTHONPATH=$(CURDIR) XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \
		XLA_FLAGS="$(XLA_FLAGS) --xla_gpu_autotune_level=0" \
		$(PYTHON) -m pytest -q -m gpu -n $(GPU_WORKERS) $(GPU_TESTS)

bench-cpu: $(STAMP)
	$(PY) -m experiments.bench_xla_cpu

clean:
	rm -rf $(VENV) build *.egg-info
