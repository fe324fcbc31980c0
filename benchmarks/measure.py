"""Timing, peak memory, the matmul ceiling and the run's environment record.

CPU: ``time.perf_counter`` around each call (the work is synchronous), warm-up first, the median of
repeated runs; the thread count (``torch.get_num_threads()``) and the load average are recorded.
GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median) when Triton is there,
else a CUDA-event loop; inputs rotate among several sets so repeated runs do not hit a warm L2.

Peak memory beyond the inputs: GPU ``torch.cuda.max_memory_allocated`` after a reset; CPU the peak
resident set size of the process (``VmHWM``, reset through ``/proc/self/clear_refs``, after
``malloc_trim``) minus the resident size before the call. ``tracemalloc`` does not see torch's
allocations, and PyTorch's CPU allocator keeps no statistics, hence RSS.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Dict, Optional, Sequence

import torch

# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def _summary(times_ms: Sequence[float]) -> Dict:
    ts = sorted(times_ms)
    q = lambda p: ts[min(len(ts) - 1, max(0, int(round(p * (len(ts) - 1)))))]  # noqa: E731
    return {
        "median_ms": statistics.median(ts),
        "min_ms": ts[0],
        "p20_ms": q(0.2),
        "p80_ms": q(0.8),
        "reps": len(ts),
    }


def time_cpu(
    fn: Callable[[], object],
    budget_s: float = 2.0,
    min_reps: int = 3,
    max_reps: int = 50,
    warmup: int = 1,
    after: Optional[Callable[[], None]] = None,
    measure_memory: bool = False,
) -> Dict:
    """Median wall time of ``fn()`` in ms. ``warmup`` calls first (compile, caches); then as many
    repetitions as fit in ``budget_s`` (estimated from the last warm-up), clamped to
    ``[min_reps, max_reps]``. ``after()`` runs untimed after each call (e.g. dropping gradients).
    ``measure_memory``: also the peak extra RSS of the last repetition (see :func:`peak_memory`),
    which costs no extra call."""
    last = 0.0
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        fn()
        last = time.perf_counter() - t0
        if after:
            after()
    reps = int(max(min_reps, min(max_reps, budget_s / max(last, 1e-6))))
    times = []
    mem = None
    for i in range(reps):
        probe = measure_memory and i == reps - 1
        if probe:  # untimed: trim the heap, reset the peak-RSS counter (no gc.collect: 0.2 s a call)
            _malloc_trim()
            base = _read_status_kb("VmRSS")
            probe = base is not None and _reset_peak_rss()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if probe:
            mem = max(_read_status_kb("VmHWM") - base, 0) / 1024
        if after:
            after()
    out = _summary(times)
    out["threads"] = torch.get_num_threads()
    if mem is not None:
        out.update(peak_mem_mib=mem, mem_method=RSS_METHOD + " (on the last timed repetition)")
    return out


def time_cuda(
    fn: Callable[[], object],
    budget_ms: float = 200.0,
    warmup_ms: float = 25.0,
    grad_to_none: Optional[Sequence[torch.Tensor]] = None,
) -> Dict:
    """Median CUDA time of ``fn()`` in ms (``triton.testing.do_bench``: events, L2 flush, median)."""
    try:
        from triton.testing import do_bench

        times = do_bench(fn, warmup=warmup_ms, rep=budget_ms, grad_to_none=grad_to_none, return_mode="all")
        return _summary(list(times))
    except ImportError:
        pass
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    reps = int(max(5, min(1000, budget_ms / est)))
    times = []
    for _ in range(reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return _summary(times)


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------


def _read_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


RSS_METHOD = "RSS peak (VmHWM after clear_refs) - RSS before"


def peak_memory(fn: Callable[[], object], device: str) -> Dict:
    """Extra memory at the peak of one ``fn()`` call, beyond what was allocated before it (MiB)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        r = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del r
        return {"peak_mem_mib": (peak - base) / 2**20, "mem_method": "cuda.max_memory_allocated"}
    _malloc_trim()
    base = _read_status_kb("VmRSS")
    if base is not None and _reset_peak_rss():
        r = fn()
        peak = _read_status_kb("VmHWM")
        del r
        return {"peak_mem_mib": max(peak - base, 0) / 1024, "mem_method": RSS_METHOD}
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del r
    return {"peak_mem_mib": max(after - before, 0) / 1024, "mem_method": "ru_maxrss growth (a lower bound)"}


# ----------------------------------------------------------------------------------------------
# the matmul ceiling
# ----------------------------------------------------------------------------------------------


def matmul_rate(
    device: str, dtype: torch.dtype, n: Optional[int] = None, budget_s: float = 1.0, sizes=None
) -> Dict:
    """GFLOP/s of ``torch.mm`` on ``n x n`` squares in this process: the roofline ceiling.

    The rate of a size is its fastest repetition (a load spike can only slow a run, never speed it up);
    with several ``sizes`` (default on the CPU: 512, 1024, 2048; with ``n``: just ``n``) the best size
    counts. ``gflops`` is that best rate; ``by_size`` keeps every size's."""
    if sizes is None:
        sizes = (n,) if n else ((512, 1024, 2048) if device == "cpu" else (8192,))
    by_size = {}
    best = None
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        flops = 2.0 * size**3
        if device == "cuda":
            t = time_cuda(lambda: torch.mm(a, b), budget_ms=budget_s * 1e3 / len(sizes))
        else:
            t = time_cpu(lambda: torch.mm(a, b), budget_s=budget_s / len(sizes), min_reps=3, max_reps=20)
        rec = {
            "n": size,
            "dtype": str(dtype).replace("torch.", ""),
            "median_ms": t["median_ms"],
            "min_ms": t["min_ms"],
            "gflops": flops / (t["min_ms"] * 1e-3) / 1e9,
            "median_gflops": flops / (t["median_ms"] * 1e-3) / 1e9,
            "threads": torch.get_num_threads(),
        }
        by_size[str(size)] = round(rec["gflops"], 2)
        if best is None or rec["gflops"] > best["gflops"]:
            best = rec
        del a, b
    best = dict(best)
    best["by_size"] = by_size
    return best


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once): the CLI's default
    thread count. Linux sysfs topology; elsewhere (or when unreadable) the usable logical CPUs."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(base + "core_id") as f:
                core = f.read().strip()
            with open(base + "physical_package_id") as f:
                pkg = f.read().strip()
        except OSError:
            return max(len(cpus), 1)
        cores.add((pkg, core))
    return max(len(cores), 1)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_model()


def _slug(s: str) -> str:
    s = s.lower()
    s = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$|\d+-core", " ", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return re.sub(r"-+", "-", s)[:40]


def device_slug(device: str) -> str:
    """``cpu-<model>-<threads>t`` or the GPU's short name (``h100``, ``h200``, ``a100``...)."""
    if device == "cuda":
        name = device_name(device).lower()
        for tag in ("h200", "h100", "b200", "gh200", "a100", "l40s", "l4", "a10g", "v100", "t4"):
            if tag in name:
                return tag
        return _slug(name)
    return f"cpu-{_slug(cpu_model())}-{torch.get_num_threads()}t"


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def git_commit(root: str) -> Dict:
    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def environment(device: str, root: str) -> Dict:
    """Everything a results file must say about where and when it was measured."""
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "physical_cores": physical_cores(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "triton": _version("triton"),
            "nuwa-kernels": _version("nuwa-kernels"),
            "natten": _version("natten"),
            "nuwa-pytorch": _version("nuwa-pytorch"),
            "cuda": torch.version.cuda,
        },
        "git": git_commit(root),
    }
    try:
        import nuwa_kernels

        env["nuwa_kernels_backends"] = {
            k: {"ok": bool(v[0]), "reason": v[1]} for k, v in nuwa_kernels.available_backends(device).items()
        }
    except Exception as e:  # noqa: BLE001
        env["nuwa_kernels_backends"] = f"{type(e).__name__}: {e}"
    return env
