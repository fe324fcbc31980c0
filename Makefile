# Quick start:  make bench  (set up + quick benchmark on the present device)
#               make test   (set up + the test suite)
# `make bench` / `make test` run scripts/setup.sh only when it, requirements/*, setup.py, pyproject.toml
# or a csrc/ source changed since the last successful setup (stamp file below); `make setup` always runs it.
PY := .venv/bin/python
PYTEST_ARGS ?=
AOT_ARGS ?= --quick
STAMP ?= .venv/.nuwa-setup.stamp
SETUP_DEPS := scripts/setup.sh setup.py pyproject.toml $(wildcard requirements/*) \
	$(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: setup bench bench-full test gpu-check check-cuda check-triton check-gpu-stack clean

setup:
	bash scripts/setup.sh

$(STAMP): $(SETUP_DEPS)
	bash scripts/setup.sh

bench: $(STAMP)
	$(PY) -m benchmarks.run --quick

bench-full: $(STAMP)
	$(PY) -m benchmarks.run --full

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# On a GPU machine without internet (torch, triton, pybind11, ninja preinstalled; no venv): build,
# GPU tests and GPU benchmarks, every log and result in one folder ($$OUT, else benchmarks/results/gpu-check-<date>/).
gpu-check:
	bash scripts/gpu_check.sh

check-cuda:
	bash scripts/check_cuda_compile.sh

check-triton: $(STAMP)
	$(PY) scripts/triton_aot_check.py $(AOT_ARGS)

# The GPU user's stack (torch 2.11 CUDA 13.0, triton 3.6) in a scratch venv: build + CPU suite.
check-gpu-stack:
	bash scripts/check_gpu_stack.sh

clean:
	rm -rf build *.egg-info nuwa_kernels/*.so nuwa_kernels/_build_info.py .pytest_cache
	rm -f $(STAMP)
