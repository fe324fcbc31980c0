# Quick start:  make bench  (set up + quick benchmark on the present device)
#               make test   (set up + the test suite)
PY := .venv/bin/python
PYTEST_ARGS ?=
AOT_ARGS ?= --quick

.PHONY: setup bench bench-full test test-gpu check-cuda check-triton clean

setup:
	bash scripts/setup.sh

bench: setup
	$(PY) -m benchmarks.run --quick

bench-full: setup
	$(PY) -m benchmarks.run --full

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

check-cuda:
	bash scripts/check_cuda_compile.sh

check-triton: setup
	$(PY) scripts/triton_aot_check.py $(AOT_ARGS)

clean:
	rm -rf build *.egg-info nuwa_kernels/*.so .pytest_cache
