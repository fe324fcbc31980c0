#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU (CI calls this).
#
#   1. every csrc/**/*.cu with nvcc for sm_80 and sm_90 (-gencode), warnings as errors, the flags of
#      setup.py (-O3 --use_fast_math -std=c++17); prints a ptxas summary per kernel (registers, spills).
#   2. the torch binding csrc/cuda/*.cpp with -fsyntax-only -DNUWA_WITH_CUDA against the installed
#      torch's headers (skipped, with a note, when no Python with torch is found).
#
# Usage: scripts/check_cuda_compile.sh [--allow-missing-nvcc] [--verbose]
#   NVCC       nvcc to use (default: nvcc on PATH, then $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc)
#   PYTHON     Python with torch for the binding check (default: .venv/bin/python, then python3)
#   CXX        host compiler for the binding check (default: c++)
#   NUWA_CUDA_ARCHS  ';'-separated compute capabilities (default "8.0;9.0", as setup.py)
# Exit status: 0 when everything compiles; non-zero on the first error (or when nvcc is missing,
# unless --allow-missing-nvcc).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALLOW_MISSING=0
VERBOSE=0
for arg in "$@"; do
  case "$arg" in
    --allow-missing-nvcc) ALLOW_MISSING=1 ;;
    --verbose) VERBOSE=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "check_cuda_compile: unknown argument $arg" >&2; exit 2 ;;
  esac
done

fail() { echo "check_cuda_compile: FAILED: $*" >&2; exit 1; }

# --- find nvcc ------------------------------------------------------------------------------------
NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC="$(command -v nvcc)"
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [[ -z "$NVCC" ]]; then
  if [[ "$ALLOW_MISSING" == 1 ]]; then
    echo "check_cuda_compile: nvcc not found; skipped (--allow-missing-nvcc)"
    exit 0
  fi
  fail "nvcc not found (set NVCC or CUDA_HOME, or pass --allow-missing-nvcc)"
fi
CUDA_INC=""
for cand in "$(dirname "$(readlink -f "$NVCC")")/../include" "${CUDA_HOME:-/nonexistent}/include" /usr/local/cuda/include; do
  if [[ -f "$cand/cuda_runtime_api.h" ]]; then CUDA_INC="$(cd "$cand" && pwd)"; break; fi
done
echo "check_cuda_compile: $("$NVCC" --version | tail -n 1)"

GENCODE=()
IFS=';' read -r -a ARCHS <<< "${NUWA_CUDA_ARCHS:-8.0;9.0}"
for arch in "${ARCHS[@]}"; do
  num="${arch//./}"
  [[ -n "$num" ]] && GENCODE+=("-gencode=arch=compute_${num},code=sm_${num}")
done

TMP="$(mktemp -d "${TMPDIR:-/tmp}/nuwa_cuda_check.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# --- 1. the .cu files ----------------------------------------------------------------------------
mapfile -t CU_FILES < <(find "$ROOT/csrc" -name '*.cu' | sort)
[[ ${#CU_FILES[@]} -gt 0 ]] || fail "no .cu files under csrc/"
for cu in "${CU_FILES[@]}"; do
  rel="${cu#"$ROOT"/}"
  log="$TMP/$(basename "$cu").log"
  echo "check_cuda_compile: nvcc $rel (${ARCHS[*]})"
  if ! "$NVCC" --threads 2 -std=c++17 -O3 --use_fast_math -lineinfo -I "$ROOT/csrc" "${GENCODE[@]}" \
        -Werror all-warnings -Xptxas -v -Xptxas -warn-spills -Xptxas -warn-lmem-usage \
        -c "$cu" -o "$TMP/$(basename "$cu").o" >"$log" 2>&1; then
    cat "$log" >&2
    fail "nvcc could not compile $rel"
  fi
  if [[ "$VERBOSE" == 1 ]]; then cat "$log"; fi
  # ptxas summary: one line per (arch, kernel): registers, spills, stack.
  python3 - "$log" <<'PY' || true
import re, subprocess, sys
text = open(sys.argv[1]).read()
entries = re.findall(r"Compiling entry function '([^']+)' for '(sm_\d+)'(.*?)(?=Compiling entry function|\Z)", text, re.S)
names = [e[0] for e in entries]
try:
    names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout.split("\n")
except Exception:
    pass
for (mangled, arch, body), name in zip(entries, names):
    regs = re.search(r"Used (\d+) registers", body)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
    stack = re.search(r"(\d+) bytes stack frame", body)
    short = re.sub(r"nuwa::cuda::(detail::|\(anonymous namespace\)::)", "", name.strip()).replace("void ", "")
    short = re.sub(r"\([^()]*\)$", "", short)
    print(f"  {arch} {short:<50} regs={regs.group(1) if regs else '?':>4} "
          f"spill={spill.group(1) + '/' + spill.group(2) if spill else '?'} stack={stack.group(1) if stack else '?'}")
PY
done

# --- 2. the torch binding ------------------------------------------------------------------------
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
fi
TORCH_INC=""
if [[ -n "$PY" ]]; then
  TORCH_INC="$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))' 2>/dev/null || true)"
fi
mapfile -t CPP_FILES < <(find "$ROOT/csrc/cuda" -name '*.cpp' 2>/dev/null | sort)
if [[ ${#CPP_FILES[@]} -gt 0 ]]; then
  if [[ -z "$TORCH_INC" ]]; then
    echo "check_cuda_compile: no Python with torch found; binding syntax check skipped"
  else
    CXX_BIN="${CXX:-c++}"
    for cpp in "${CPP_FILES[@]}"; do
      rel="${cpp#"$ROOT"/}"
      echo "check_cuda_compile: $CXX_BIN -fsyntax-only $rel (torch headers, -DNUWA_WITH_CUDA)"
      # shellcheck disable=SC2086
      [[ -n "$CUDA_INC" ]] || fail "cuda_runtime_api.h not found next to $NVCC, in \$CUDA_HOME/include or /usr/local/cuda/include"
      "$CXX_BIN" -std=c++17 -fsyntax-only -Wall -Wno-c++20-extensions -DNUWA_WITH_CUDA -I "$ROOT/csrc" \
        $TORCH_INC -I "$CUDA_INC" "$cpp" || fail "$rel does not compile against the torch headers"
    done
  fi
fi
echo "check_cuda_compile: OK"
