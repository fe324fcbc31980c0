#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the tests and benchmarks need, then build
# and install nuwa-kernels into it (editable, C++ extension included). `make setup` runs it always;
# `make test` / `make bench` run it only when it, requirements/*, setup.py, pyproject.toml or csrc/
# changed since its last success (stamp: .venv/.nuwa-setup.stamp, written at the end).
#
# * Reuses a torch that the interpreter already has (a GPU box); otherwise installs the pinned
#   torch==2.13.0: on a machine without a GPU the CPU build, from the PyTorch CPU wheel index
#   (falling back to pip's configured index when that index cannot be reached); with a GPU the
#   default (CUDA) build from pip's index. Never lets pip resolve an unpinned torch (GBs of CUDA wheels).
# * Optional peers (triton, natten, nuwa-pytorch) are installed when they can be; the code reports
#   clearly when one is missing.
# Knobs:
#   PYTHON                interpreter to base the venv on (default python3)
#   NUWA_TORCH_INDEX_URL  index to install torch from (default: https://download.pytorch.org/whl/cpu
#                         without a GPU, pip's configured index with one); set it empty to use pip's
#                         configured index always
#   MAX_JOBS, NUWA_SKIP_CUDA, NUWA_CUDA_ARCHS, CUDA_HOME, NUWA_SKIP_EXT  (read by setup.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=torch==2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
STAMP=.venv/.nuwa-setup.stamp
rm -f "$STAMP"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
# Whether a package index answers within a few seconds (pip itself would retry for minutes).
index_reachable() {
  "$VPY" - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
except urllib.error.HTTPError:
    pass  # the server answered: reachable (pip reports what it lacks)
PY
}

if "$VPY" -c "import torch" 2>/dev/null; then
  echo "setup: reusing torch $("$VPY" -c 'import torch; print(torch.__version__)')"
else
  if have_gpu; then
    INDEX=${NUWA_TORCH_INDEX_URL-}
    KIND="default build (a GPU is present)"
  else
    INDEX=${NUWA_TORCH_INDEX_URL-$CPU_INDEX}
    KIND="CPU build"
  fi
  if [ -n "$INDEX" ] && index_reachable "$INDEX"; then
    echo "setup: installing $TORCH_PIN ($KIND, from $INDEX)"
    pip_install "$TORCH_PIN" --index-url "$INDEX" || {
      echo "setup: $TORCH_PIN from $INDEX failed; using pip's configured index"
      pip_install "$TORCH_PIN"
    }
  else
    [ -n "$INDEX" ] && echo "setup: $INDEX cannot be reached; using pip's configured index"
    echo "setup: installing $TORCH_PIN ($KIND, from pip's configured index)"
    pip_install "$TORCH_PIN"
  fi
  if ! have_gpu && "$VPY" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
    echo "setup: note: pip's index gave a CUDA build of torch on a machine without a GPU (it runs on CPU," \
         "but is large); set NUWA_TORCH_INDEX_URL to a CPU wheel index to avoid it"
  fi
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
from nuwa_kernels import _extension
dev = "cuda" if torch.cuda.is_available() else "cpu"
print(f"setup: torch {torch.__version__}, device {dev}")
for name, (ok, why) in nk.available_backends(dev).items():
    print(f"setup:   backend {name:9s} {'ok' if ok else 'unavailable: ' + why}")
import os
off = lambda var: os.environ.get(var, "0") in ("", "0")  # noqa: E731
if not _extension.loaded() and off("NUWA_SKIP_EXT") and off("NUWA_KERNELS_NO_EXT"):
    raise SystemExit(f"setup: FAILED: {_extension.LOAD_ERROR}; fix: {_extension.LOAD_FIX}")
PY
touch "$STAMP"
echo "setup: done (python -m nuwa_kernels prints the full environment report)"
