#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the tests and benchmarks need, then build
# and install nuwa-kernels into it (editable, C++ extension included).
#
# * Reuses a torch that the interpreter already has (a GPU box); otherwise installs the pinned CPU
#   build torch==2.13.0. Never lets pip resolve an unpinned torch (that pulls GBs of CUDA wheels).
# * Optional peers (triton, natten, nuwa-pytorch) are installed when they can be; the code reports
#   clearly when one is missing.
# Knobs: PYTHON (interpreter to base the venv on), MAX_JOBS, NUWA_SKIP_CUDA, NUWA_CUDA_ARCHS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  pip_install torch==2.13.0
fi
pip_install -r requirements/dev.txt
"$VPY" -c "import triton" 2>/dev/null || pip_install triton==3.9.0 || echo "setup: triton not installed (the triton backend will report it)"
# NATTEN (external oracle for border='shift', benchmark peer): pure-Python install on CPU-only torch.
"$VPY" -c "import natten" 2>/dev/null || pip_install --no-build-isolation natten==0.21.7 || echo "setup: natten not installed"
# Extra peers and integrations (benchmarks, nuwa.integrations); no-deps so torch is never replaced.
[ -f requirements/extras.sh ] && . requirements/extras.sh
echo "setup: building nuwa-kernels (C++ extension; CUDA kernels when torch has CUDA)"
MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation --no-deps -e .
"$VPY" - <<'PY'
import nuwa_kernels as nk, torch
dev = "cuda" if torch.cuda.is_available() else "cpu"
print(f"setup: torch {torch.__version__}, device {dev}")
for name, (ok, why) in nk.available_backends(dev).items():
    print(f"setup:   backend {name:9s} {'ok' if ok else 'unavailable: ' + why}")
PY
