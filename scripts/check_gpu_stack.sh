#!/usr/bin/env bash
# Build the GPU user's stack without a GPU and check that nuwa-kernels builds, loads and passes its
# CPU test suite there. Run it before closing any change to setup.py, csrc/cuda or the Triton kernels.
#
# The stack is the one the GPU machines have: torch==2.11.0 (the CUDA 13.0 wheel from PyPI, several
# GB of nvidia-* wheels), triton==3.6.0, numpy<2.4, the dev requirements, Python 3.12 when present.
# The project is copied (tracked and untracked-not-ignored files) into the scratch folder and built
# there, so the working tree's own build (.venv, nuwa_kernels/_C*.so) is never touched.
#
# Usage: scripts/check_gpu_stack.sh [--subset] [--no-tests] [-- PYTEST_ARGS...]
#   --subset     run a quick subset of the suite (tests/test_packaging.py, test_ops.py, test_api.py)
#   --no-tests   stop after the build and load checks
#   -- ARGS      pass ARGS to pytest instead of the default (the whole CPU suite, -x -q)
# Environment:
#   NUWA_GPU_STACK_DIR  scratch folder (default /tmp/nuwa-gpu-stack); its venv/ is reused across runs
#   PYTHON              interpreter to base the venv on (default: python3.12 if found, else python3)
#   MAX_JOBS            parallel compile jobs (default 2)
#   CUDA_HOME           CUDA toolkit; when unset setup.py finds it from the nvcc on the PATH, even
#                       when that nvcc is a wrapper script
# Exit status: 0 when the build, the load checks and the tests pass.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${NUWA_GPU_STACK_DIR:-/tmp/nuwa-gpu-stack}"
TORCH_PIN="torch==2.11.0"
TRITON_PIN="triton==3.6.0"
MODE=full
PYTEST_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --subset) MODE=subset ;;
    --no-tests) MODE=none ;;
    --) shift; PYTEST_ARGS=("$@"); MODE=custom; break ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "check_gpu_stack: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
log() { echo "check_gpu_stack: $*"; }
fail() { echo "check_gpu_stack: FAILED: $*" >&2; exit 1; }

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 python3; do
    # (a pyenv shim exists for every version but fails for those not selected: try to run it)
    if "$cand" -c "import venv" >/dev/null 2>&1; then PY="$(command -v "$cand")"; break; fi
  done
fi
[[ -n "$PY" ]] || fail "no python3 found (set PYTHON)"
mkdir -p "$DIR"
VPY="$DIR/venv/bin/python"
if [[ ! -x "$VPY" ]]; then
  log "creating $DIR/venv from $PY ($("$PY" --version 2>&1))"
  "$PY" -m venv "$DIR/venv"
fi
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
# Compile caches of their own: torch inductor's default cache (/tmp/torchinductor_$USER) is shared with
# every other torch on the machine, and a kernel cached by another torch version can abort this one.
export TORCHINDUCTOR_CACHE_DIR="$DIR/cache/inductor" TRITON_CACHE_DIR="$DIR/cache/triton"

# --- 1. the stack ---------------------------------------------------------------------------------
CONSTRAINTS="$DIR/constraints.txt"
printf '%s\n' "$TORCH_PIN" "$TRITON_PIN" "numpy<2.4" > "$CONSTRAINTS"
if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.11.0' or torch.version.cuda is None)" 2>/dev/null; then
  log "installing $TORCH_PIN (CUDA wheel, several GB) and $TRITON_PIN"
  pip_install -c "$CONSTRAINTS" "$TORCH_PIN" "$TRITON_PIN" "numpy<2.4"
fi
pip_install -c "$CONSTRAINTS" -r "$ROOT/requirements/dev.txt" setuptools wheel pybind11
"$VPY" - <<'PY'
import sys, numpy, torch, triton
print(f"check_gpu_stack: python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, numpy {numpy.__version__}")
assert torch.version.cuda is not None, "torch is not a CUDA build"
PY

# --- 2. a copy of the project, built against it -----------------------------------------------------
SRC="$DIR/src"
log "copying the project to $SRC"
# Keep the previous copy's build/ folder: ninja then recompiles only the sources that changed.
rm -rf "$DIR/build-keep"
[[ -d "$SRC/build" ]] && mv "$SRC/build" "$DIR/build-keep"
rm -rf "$SRC"
mkdir -p "$SRC"
[[ -d "$DIR/build-keep" ]] && mv "$DIR/build-keep" "$SRC/build"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
   [[ -e "$f" ]] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -C "$SRC" -xf -
log "building (MAX_JOBS=${MAX_JOBS:-2}, CUDA_HOME=${CUDA_HOME:-<found by setup.py from nvcc>})"
start=$(date +%s)
(cd "$SRC" && MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install --no-build-isolation --no-deps -e . >"$DIR/build.log" 2>&1) \
  || { tail -n 60 "$DIR/build.log" >&2; fail "the build failed (log: $DIR/build.log)"; }
log "built in $(( $(date +%s) - start )) s (log: $DIR/build.log)"

# --- 3. load checks --------------------------------------------------------------------------------
(cd "$SRC" && "$VPY" - <<'PY') || fail "load checks"
import torch
import nuwa_kernels as nk
from nuwa_kernels import _extension
assert _extension.loaded(), f"nuwa_kernels._C did not load: {_extension.LOAD_ERROR}"
for op in ("na3d_fwd", "na3d_bwd"):
    name = f"nuwa_kernels::{op}"
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name} has no {key} kernel"
info = getattr(_extension, "BUILD_INFO", None) or {}
assert info.get("cuda") and info.get("ptx_arch"), f"the build record says no CUDA kernels or no PTX: {info}"
print(f"check_gpu_stack: nuwa_kernels._C loaded; na3d_fwd/na3d_bwd have CPU and CUDA kernels; build info {info}")
PY
(cd "$SRC" && "$VPY" -m nuwa_kernels) || fail "python -m nuwa_kernels"

# --- 4. the CPU test suite -------------------------------------------------------------------------
case "$MODE" in
  none) log "OK (tests skipped: --no-tests)"; exit 0 ;;
  subset) PYTEST_ARGS=(tests/test_packaging.py tests/test_ops.py tests/test_api.py -x -q -p no:cacheprovider) ;;
  full) PYTEST_ARGS=(tests -x -q -p no:cacheprovider) ;;
esac
log "pytest ${PYTEST_ARGS[*]}"
(cd "$SRC" && NUWA_REQUIRE_BACKENDS="${NUWA_REQUIRE_BACKENDS:-cpu,triton}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
   "$VPY" -m pytest "${PYTEST_ARGS[@]}") || fail "tests (run in $SRC)"
log "OK"
