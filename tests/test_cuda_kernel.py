"""The fused CUDA kernels (``backend="cuda"``, csrc/cuda/) against the float64 oracle.

GPU tests skip without a CUDA device (CI sets ``NUWA_REQUIRE_BACKENDS=cuda`` on GPU runners so an
unbuilt backend fails instead of skipping). The compile checks at the bottom need only nvcc (and the
torch headers) and run on CPU-only machines: one nvcc call for sm_80 + sm_90.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
import torch

import nuwa_kernels as nk
from oracle import TOLERANCE, oracle_attention, random_grid_inputs, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}



def gpu_test(fn):
    """Marks a test ``gpu`` and skips it without a CUDA device."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.gpu(skip(fn))


def _require_cuda_backend(q, k, v, **kw) -> None:
    ok, why = nk.can_run("cuda", q, k, v, **kw)
    if ok:
        return
    required = [b.strip() for b in os.environ.get("NUWA_REQUIRE_BACKENDS", "").split(",") if b.strip()]
    if "cuda" in required:
        pytest.fail(f"backend 'cuda' is required here (NUWA_REQUIRE_BACKENDS) but cannot run: {why}")
    pytest.skip(f"cuda: {why}")


from test_backends import Case  # noqa: E402  (the shared case record)


# Curated odd sizes: every head-dim bucket (8, 16, 32, 64, 128, 256, and partial buckets 40, 96),
# both borders, raster and per-axis causality, even kernels, None, cross grids, grouped heads.
CASES = [
    Case("image-133-d32", (1, 5, 6), (1, 5, 6), 2, 2, 32, (1, 3, 3)),
    Case("video-333-raster-gqa-d64", (3, 4, 5), (3, 4, 5), 4, 2, 64, 3, True),
    Case("video-333-frame-causal-d64", (3, 4, 5), (3, 4, 5), 2, 2, 64, 3, (True, False, False)),
    Case("even-shift-d40", (3, 4, 5), (3, 4, 5), 4, 2, 40, (2, 4, 2), False, "shift"),
    Case("even-truncate-causal-hw-d128", (2, 5, 4), (2, 5, 4), 2, 2, 128, (2, 3, 4), (False, True, True)),
    Case("text-none-raster-d64", (9, 1, 1), (9, 1, 1), 2, 1, 64, (None, 1, 1), True),
    Case("none-mixed-raster-shift-d32", (2, 3, 4), (2, 3, 4), 2, 2, 32, (None, 2, None), True, "shift"),
    Case("k1-identity-d32", (2, 3, 3), (2, 3, 3), 2, 2, 32, 1),
    Case("cross-up-shift-d96", (4, 6, 5), (2, 3, 7), 4, 2, 96, (3, 2, 5), (True, False, False), "shift"),
    Case("cross-down-d256", (2, 3, 4), (3, 5, 6), 2, 1, 256, (2, 3, None), False, "truncate", 1),
    Case("big-window-7-shift-d64", (3, 4, 5), (3, 4, 5), 2, 2, 64, 7, False, "shift", 1),
    Case("d8-raster", (2, 3, 4), (2, 3, 4), 3, 1, 8, (3, 3, 3), True),
    Case("d16-causal-thw", (3, 3, 4), (3, 3, 4), 2, 2, 16, (2, 2, 3), (True, True, True)),
]
HALF_GRAD_CASES = [c for c in CASES if c.id.startswith(("video-333-raster", "cross-up", "even-shift", "d16"))]


def _inputs(case: Case, dtype, requires_grad=False):
    return random_grid_inputs(case.B, case.q_grid, case.kv_grid, case.heads, case.heads_kv, case.D,
                              dtype=dtype, device="cuda", requires_grad=requires_grad)


def _oracle_grads(q, k, v, g_out, g_lse, **kw):
    qc, kc, vc = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = oracle_attention(qc, kc, vc, **kw)
    outs, grads = (ref_out,), (g_out.cpu().double(),)
    if g_lse is not None:
        outs, grads = (ref_out, ref_lse), (g_out.cpu().double(), g_lse.cpu().double())
    return torch.autograd.grad(outs, (qc, kc, vc), grads)


# --------------------------------------------------------------------------------------------------
# Numerics against the oracle.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@gpu_test
def test_forward_and_lse(case, dtype):
    q, k, v = _inputs(case, dtype)
    _require_cuda_backend(q, k, v, **case.kw())
    out, lse = nk.nearby_attention(q, k, v, **case.kw(), return_lse=True, backend="cuda")
    ref_out, ref_lse = oracle_attention(q.cpu(), k.cpu(), v.cpu(), **case.kw())
    assert out.shape == ref_out.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert rel_err(out.cpu(), ref_out) < TOLERANCE[dtype]
    assert rel_err(lse.cpu(), ref_lse) < TOLERANCE[dtype]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@gpu_test
def test_gradients_fp32(case):
    """dq, dk, dv (through out and the LSE) in float32 against the float64 oracle's autograd."""
    q, k, v = _inputs(case, torch.float32, requires_grad=True)
    _require_cuda_backend(q, k, v, **case.kw())
    out, lse = nk.nearby_attention(q, k, v, **case.kw(), return_lse=True, backend="cuda")
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (g_out, g_lse))
    ref = _oracle_grads(q, k, v, g_out, g_lse, **case.kw())
    for name, g, r in zip("qkv", grads, ref):
        assert g.shape == r.shape and g.dtype == torch.float32, name
        assert rel_err(g.cpu(), r) < TOLERANCE[torch.float32] * 4, f"grad {name}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", HALF_GRAD_CASES, ids=lambda c: c.id)
@gpu_test
def test_gradients_half(case, dtype):
    q, k, v = _inputs(case, dtype, requires_grad=True)
    _require_cuda_backend(q, k, v, **case.kw())
    out = nk.nearby_attention(q, k, v, **case.kw(), backend="cuda")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = _oracle_grads(q, k, v, g, None, **case.kw())
    for name, gr, r in zip("qkv", grads, ref):
        assert gr.dtype == dtype
        assert rel_err(gr.cpu(), r) < TOLERANCE[dtype] * 2, f"grad {name}"


# --------------------------------------------------------------------------------------------------
# Layout: strides, alignment, 64-bit offsets.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@gpu_test
def test_strided_and_misaligned_inputs(dtype):
    """Permuted/sliced views (vector path), a non-unit head-dim stride and a misaligned base pointer
    (scalar path) give the oracle's answer, forward and backward, with no hidden copies."""
    B, grid, heads, D = 2, (2, 3, 5), 4, 32
    N = grid[0] * grid[1] * grid[2]
    base = torch.randn(B, heads, N, 2 * D, dtype=dtype, device="cuda")
    q = base[..., D:].transpose(1, 2).unflatten(1, grid)  # (B, heads, N, D) view, sliced
    kv = torch.randn(B, 2 * heads, N, D, dtype=dtype, device="cuda")
    k = kv[:, ::2].transpose(1, 2).unflatten(1, grid)  # every other head
    v = torch.randn(B, *grid, D, heads, dtype=dtype, device="cuda").transpose(-1, -2)  # head-dim stride != 1
    flat = torch.randn(B * N * heads * D + 1, dtype=dtype, device="cuda")
    q2 = flat[1:].view(B, *grid, heads, D)  # base pointer misaligned by one element
    kw = dict(kernel_size=(2, 3, 3), causal=True)
    for qq in (q, q2):
        assert not (k.is_contiguous() or v.is_contiguous())
        qq = qq.detach().requires_grad_()
        kk, vv = k.detach().requires_grad_(), v.detach().requires_grad_()
        _require_cuda_backend(qq, kk, vv, **kw)
        out = nk.nearby_attention(qq, kk, vv, **kw, backend="cuda")
        ref, _ = oracle_attention(qq.detach().cpu(), kk.detach().cpu(), vv.detach().cpu(), **kw)
        assert rel_err(out.cpu(), ref) < TOLERANCE[dtype]
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (qq, kk, vv), g)
        refg = _oracle_grads(qq, kk, vv, g, None, **kw)
        for name, gr, r in zip("qkv", grads, refg):
            assert rel_err(gr.cpu(), r) < TOLERANCE[dtype] * 4, f"grad {name}"


@gpu_test
def test_expanded_grad_out():
    """A stride-0 grad_out (from .sum().backward()) is read correctly."""
    case = CASES[1]
    q, k, v = _inputs(case, torch.float32, requires_grad=True)
    _require_cuda_backend(q, k, v, **case.kw())
    nk.nearby_attention(q, k, v, **case.kw(), backend="cuda").sum().backward()
    ref = _oracle_grads(q, k, v, torch.ones(q.shape, dtype=torch.float64), None, **case.kw())
    for name, t, r in zip("qkv", (q, k, v), ref):
        assert rel_err(t.grad.cpu(), r) < TOLERANCE[torch.float32] * 4, f"grad {name}"


@pytest.mark.slow
@gpu_test
def test_64bit_offsets():
    """Views into a storage above 2**31 elements: batch 1 starts past element 2**31."""
    big = 2**31 + 2**16
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * big * 2:
        pytest.skip("needs about 13 GB of free GPU memory")
    grid, heads, D = (2, 3, 4), 2, 32
    inner = grid[0] * grid[1] * grid[2] * heads * D
    shape = (2, *grid, heads, D)
    stride = (2**31, grid[1] * grid[2] * heads * D, grid[2] * heads * D, heads * D, D, 1)
    views = []
    for _ in range(3):
        storage = torch.empty(big, dtype=torch.float16, device="cuda")
        storage[:inner].normal_()
        storage[2**31 : 2**31 + inner].normal_()
        views.append(storage.as_strided(shape, stride).requires_grad_())
    q, k, v = views
    _require_cuda_backend(q, k, v, kernel_size=3, causal=True)
    out, lse = nk.nearby_attention(q, k, v, kernel_size=3, causal=True, return_lse=True, backend="cuda")
    qc, kc, vc = (t.detach().cpu() for t in (q, k, v))
    ref_out, ref_lse = oracle_attention(qc, kc, vc, kernel_size=3, causal=True)
    assert rel_err(out.cpu(), ref_out) < TOLERANCE[torch.float16]
    assert rel_err(lse.cpu(), ref_lse) < TOLERANCE[torch.float16]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = _oracle_grads(q, k, v, g, None, kernel_size=3, causal=True)
    for name, gr, r in zip("qkv", grads, ref):
        assert rel_err(gr.cpu(), r) < TOLERANCE[torch.float16] * 2, f"grad {name}"


# --------------------------------------------------------------------------------------------------
# Behaviour.
# --------------------------------------------------------------------------------------------------


@gpu_test
def test_backward_is_deterministic():
    case = Case("gqa-video", (4, 6, 6), (4, 6, 6), 8, 2, 64, (3, 5, 5), True)
    q, k, v = _inputs(case, torch.float16, requires_grad=True)
    _require_cuda_backend(q, k, v, **case.kw())
    out = nk.nearby_attention(q, k, v, **case.kw(), backend="cuda")
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@gpu_test
@pytest.mark.parametrize("stride", [[1, 1, 1], [1, 2, 1]])
def test_opcheck_cuda_op(stride):
    q, k, v = random_grid_inputs(2, (2, 3, 4), (2, 3, 4), 4, 2, 32, dtype=torch.float32, device="cuda",
                                 requires_grad=True)
    _require_cuda_backend(q, k, v)
    # the op schema: kernel_size, causal_axes, raster_causal, shift_border, stride, slab, scale
    args = ([3, 3, 3], [False, False, False], True, False, stride, [], 0.3)
    fwd = torch.ops.nuwa_kernels.na3d_fwd.default
    torch.library.opcheck(fwd, (q, k, v, *args))
    with torch.no_grad():
        out, lse = fwd(q, k, v, *args)
    g = torch.randn_like(out)
    delta = (g * out).sum(-1)
    bwd = torch.ops.nuwa_kernels.na3d_bwd.default
    torch.library.opcheck(bwd, (g, q.detach(), k.detach(), v.detach(), lse, delta, *args))


@gpu_test
def test_empty_batch():
    q = torch.randn(0, 2, 3, 4, 2, 32, device="cuda", requires_grad=True)
    _require_cuda_backend(q, q, q)
    out, lse = nk.nearby_attention(q, q, q, return_lse=True, backend="cuda")
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_can_run_reasons():
    """Runs everywhere: CPU tensors are refused with a reason naming the cause."""
    q = torch.zeros(1, 1, 2, 2, 1, 32)
    ok, why = nk.can_run("cuda", q, q, q)
    assert not ok and why
    with pytest.raises(nk.BackendUnavailableError):
        nk.nearby_attention(q, q, q, backend="cuda")
    if torch.cuda.is_available():
        from nuwa_kernels.backends import cuda as cuda_backend

        if cuda_backend.kernels_error() is None:
            qc = q.cuda()
            assert "CUDA tensors" in why
            bad = torch.zeros(1, 1, 2, 2, 1, 12, device="cuda")
            assert "head dim" in nk.can_run("cuda", bad, bad, bad)[1]
            assert "dtype" in nk.can_run("cuda", qc.double(), qc.double(), qc.double())[1]


def test_availability_check_traces_as_a_constant():
    """``torch.compile(fullgraph=True)`` over a call that asks whether the CUDA kernels exist: the
    dispatcher query is not traceable, so the answer must reach dynamo as a constant (a GPU run found
    the graph break)."""
    from nuwa_kernels.backends import cuda as cuda_backend

    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + (1.0 if cuda_backend.kernels_error() is None else 2.0), fullgraph=True,
                       backend="eager")
    x = torch.randn(3)
    want = 1.0 if cuda_backend.kernels_error() is None else 2.0
    torch.testing.assert_close(fn(x), x + want)


# --------------------------------------------------------------------------------------------------
# The same kernels without a GPU: host emulation of the device code (tests/cuda_host_emulation.cpp).
# --------------------------------------------------------------------------------------------------


def _cuda_include_dir():
    nvcc = _nvcc()
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "include"), "/usr/local/cuda/include"]
    if nvcc is not None:
        cands.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    return next((p for p in cands if os.path.exists(os.path.join(p, "cuda_runtime_api.h"))), None)


@pytest.fixture(scope="module")
def emulator():
    """The CUDA kernels compiled for the host (about a minute to build; cached by content hash)."""
    import hashlib

    from torch.utils.cpp_extension import is_ninja_available, load

    cuda_inc = _cuda_include_dir()
    if cuda_inc is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit headers (cuda_fp16.h)")
    if not is_ninja_available():
        pytest.skip("torch.utils.cpp_extension.load needs ninja")
    source = os.path.join(ROOT, "tests", "cuda_host_emulation.cpp")
    deps = [source, os.path.join(ROOT, "csrc", "window.h")]
    deps += sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")))
    digest = hashlib.sha256(b"".join(open(p, "rb").read() for p in deps)).hexdigest()[:16]
    name = f"nuwa_cuda_host_emulation_{digest}"
    build_dir = os.path.join(os.environ.get("NUWA_EMULATION_BUILD_DIR", os.path.join(
        os.path.expanduser("~"), ".cache", "nuwa_kernels")), name)
    os.makedirs(build_dir, exist_ok=True)
    return load(name=name, sources=[source], extra_include_paths=[os.path.join(ROOT, "csrc"), cuda_inc],
                extra_cflags=["-O2", "-w"], extra_ldflags=["-pthread"], build_directory=build_dir,
                verbose=False)


def _emulated(emulator, q, k, v, case: Case, max_blocks=2):
    """Forward and backward of the emulated kernels against the oracle; returns the relative errors."""
    from nuwa_kernels.window import make_window_spec

    spec = make_window_spec(case.q_grid, case.kv_grid, case.kernel_size, case.causal, case.border)
    scale = case.D ** -0.5
    args = (list(spec.kernel_size), [int(c) for c in spec.causal_axes], spec.raster_causal, spec.shift_border,
            list(spec.stride), spec.slab_args(), scale, max_blocks)
    out, lse, _ = emulator.emu_fwd(q, k, v, *args)
    qc, kc, vc = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = oracle_attention(qc, kc, vc, **case.kw())
    g_out = torch.randn(out.shape).to(q.dtype)
    g_lse = torch.randn(lse.shape)
    ref = torch.autograd.grad((ref_out, ref_lse), (qc, kc, vc), (g_out.double(), g_lse.double()))
    delta = (g_out.float() * out.float()).sum(-1) - g_lse  # as the shared autograd forms it
    dq, dk, dv, _ = emulator.emu_bwd(g_out, q, k, v, lse, delta, *args)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    return {"out": rel_err(out, ref_out.detach()), "lse": rel_err(lse, ref_lse.detach()),
            "dq": rel_err(dq, ref[0]), "dk": rel_err(dk, ref[1]), "dv": rel_err(dv, ref[2])}


def _check_errors(errs, dtype):
    tol = TOLERANCE[dtype]
    bad = {k: e for k, e in errs.items() if e >= (tol if k in ("out", "lse") else 4 * tol)}
    assert not bad, f"relative errors above the bound ({tol}): {bad}; all: {errs}"


# Smaller grids than CASES (the emulator runs every lane as a host thread) and every head-dim bucket.
EMU_CASES = [
    Case("image-133-d8", (1, 5, 6), (1, 5, 6), 2, 2, 8, (1, 3, 3), B=1),
    Case("video-333-raster-gqa-d16", (3, 4, 5), (3, 4, 5), 2, 1, 16, 3, True, B=1),
    Case("frame-causal-d32", (3, 3, 4), (3, 3, 4), 2, 2, 32, 3, (True, False, False), B=1),
    Case("even-shift-d40", (2, 4, 5), (2, 4, 5), 4, 2, 40, (2, 4, 2), False, "shift", B=1),
    Case("even-truncate-causal-hw-d8", (2, 5, 4), (2, 5, 4), 2, 2, 8, (2, 3, 4), (False, True, True)),
    Case("text-none-raster-d64", (6, 1, 1), (6, 1, 1), 2, 1, 64, (None, 1, 1), True, B=1),
    Case("none-mixed-raster-shift-d8", (2, 3, 4), (2, 3, 4), 2, 2, 8, (None, 2, None), True, "shift"),
    Case("k1-identity-d16", (2, 3, 3), (2, 3, 3), 2, 2, 16, 1, B=1),
    Case("cross-up-shift-d8", (4, 6, 5), (2, 3, 7), 4, 2, 8, (3, 2, 5), (True, False, False), "shift", B=1),
    Case("cross-down-d128", (1, 3, 4), (2, 5, 6), 1, 1, 128, (2, 3, None), False, "truncate", B=1),
    Case("big-window-7-raster-d16", (2, 4, 5), (2, 4, 5), 2, 2, 16, 7, True, "truncate", B=1),
    Case("d256", (1, 2, 3), (1, 2, 3), 1, 1, 256, 3, False, "shift", B=1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: c.id)
def test_emulated_kernels_match_oracle(emulator, case, dtype):
    """Forward (out, LSE) and backward (dQ, dK, dV) of the CUDA kernels, run on the host."""
    q, k, v = random_grid_inputs(case.B, case.q_grid, case.kv_grid, case.heads, case.heads_kv, case.D,
                                 dtype=dtype)
    _check_errors(_emulated(emulator, q, k, v, case), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_emulated_kernels_strided_and_misaligned(emulator, dtype):
    """Scalar paths: a non-unit head-dim stride (value) and a base pointer off 16-byte alignment (query);
    a permuted (B, heads, N, D) view (key) keeps the vector path."""
    case = Case("strided", (2, 3, 5), (2, 3, 5), 2, 2, 16, (2, 3, 3), True)
    B, grid, heads, D = case.B, case.q_grid, case.heads, case.D
    N = grid[0] * grid[1] * grid[2]
    flat = torch.randn(B * N * heads * D + 1).to(dtype)
    q = flat[1:].view(B, *grid, heads, D)
    k = torch.randn(B, heads, N, D).to(dtype).transpose(1, 2).unflatten(1, grid)
    v = torch.randn(B, *grid, D, heads).to(dtype).transpose(-1, -2)
    _check_errors(_emulated(emulator, q, k, v, case), dtype)


# --------------------------------------------------------------------------------------------------
# Compile checks (no GPU needed).
# --------------------------------------------------------------------------------------------------


def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME", "/nonexistent")
    candidates = (os.path.join(cuda_home, "bin", "nvcc"), "/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or next((p for p in candidates if os.path.exists(p)), None)


def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    """Every csrc/**/*.cu compiles for sm_80 and sm_90 in one nvcc call (the flags of setup.py)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    assert sources, "no .cu sources under csrc/"
    cmd = [nvcc, "--threads", "2", "-std=c++17", "-O3", "--use_fast_math", "-I", os.path.join(ROOT, "csrc"),
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           "-Werror", "all-warnings", "-c", *sources, "--output-directory", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed:\n{res.stdout}\n{res.stderr}"


def test_cuda_binding_compiles_against_torch_headers():
    """csrc/cuda/*.cpp passes -fsyntax-only with -DNUWA_WITH_CUDA against the installed torch headers."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    cuda_inc = _cuda_include_dir()
    if cuda_inc is None:
        pytest.skip("cuda_runtime_api.h not found")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if not sources:
        pytest.skip("no binding sources")
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(ROOT, 'csrc')}", f"-I{cuda_inc}"]
    for src in sources:
        res = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-w", "-DNUWA_WITH_CUDA", *incs, src],
                             capture_output=True, text=True)
        assert res.returncode == 0, f"{src} does not compile:\n{res.stderr[-4000:]}"


@pytest.mark.parametrize("stride,slab,causal,border", [
    ((1, 2, 3), None, True, "truncate"),
    ((2, 1, 2), None, (True, False, True), "shift"),
    ((1, 1, 1), ((1, 0, 0), (0, 0, 0), (5, 4, 5), (5, 4, 5)), True, "truncate"),
    ((2, 2, 1), ((0, 1, 0), (0, 0, 0), (3, 6, 5), (3, 6, 5)), (False, True, False), "shift"),
], ids=["stride-raster", "stride-causal-tw-shift", "slab-t-raster", "slab-h-stride"])
def test_emulated_kernels_stride_and_slab(emulator, stride, slab, causal, border):
    """Stride (section 3a) and slabs (windows of a larger global grid) in the CUDA kernels, against the
    reference backend's ops (tested against the float64 oracle) in float64."""
    from nuwa_kernels import _ops
    from nuwa_kernels.backends import reference
    from nuwa_kernels.window import Slab, make_window_spec

    q_grid, kv_grid = ((3, 3, 5), (4, 4, 5)) if slab else ((3, 4, 5), (3, 4, 5))
    slab = Slab(*slab) if slab else None
    spec = make_window_spec(q_grid, kv_grid, 3, causal, border, stride, slab)
    q, k, v = random_grid_inputs(1, q_grid, kv_grid, 2, 1, 16, dtype=torch.float32)
    scale = 16 ** -0.5
    args = (list(spec.kernel_size), [int(c) for c in spec.causal_axes], spec.raster_causal, spec.shift_border,
            list(spec.stride), spec.slab_args(), scale, 4)
    out, lse, _ = emulator.emu_fwd(q, k, v, *args)
    qd, kd, vd = (t.double() for t in (q, k, v))
    ref_out, ref_lse = reference.FWD_OP(qd, kd, vd, *_ops.spec_op_args(spec), scale)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
    g = torch.randn(out.shape)
    delta = (g * out).sum(-1)
    dq, dk, dv, _ = emulator.emu_bwd(g, q, k, v, lse, delta, *args)
    rq, rk, rv = reference.BWD_OP(g.double(), qd, kd, vd, ref_lse, (g.double() * ref_out).sum(-1),
                                  *_ops.spec_op_args(spec), scale)
    assert rel_err(dq, rq) < 4e-5 and rel_err(dk, rk) < 4e-5 and rel_err(dv, rv) < 4e-5
