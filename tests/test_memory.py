"""The reference backend is memory-bounded: a 16x32x32 grid with 16 heads of 64 runs in a few GB."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import resource, torch, nuwa_kernels as nk
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, 32, 32, 16, 64) for _ in range(3))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = nk.nearby_attention(q, k, v, kernel_size=3, causal=True, backend="reference")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # spot-check one query row against a direct computation over its 3x3x3 causal window
    t, h, w, head = 5, 7, 9, 3
    keys = [(a, b, c) for a in range(t - 1, t + 2) for b in range(h - 1, h + 2) for c in range(w - 1, w + 2)
            if (a * 32 + b) * 32 + c <= (t * 32 + h) * 32 + w]
    kk = torch.stack([k[0, a, b, c, head] for a, b, c in keys]).double()
    vv = torch.stack([v[0, a, b, c, head] for a, b, c in keys]).double()
    p = torch.softmax(kk @ q[0, t, h, w, head].double() / 8.0, 0)
    err = ((p @ vv) - out[0, t, h, w, head].double()).abs().max().item()
    print((peak - base) / 2**10, err)
    """
)


def test_reference_16x32x32_is_memory_bounded():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    peak_gib, err = (float(x) for x in res.stdout.split()[-2:])
    peak_gib /= 1024  # ru_maxrss is KiB on Linux; printed in MiB
    # full attention scores alone would be 16 heads x 16384^2 x 4 B = 16 GiB
    assert peak_gib < 4.0, f"peak RSS grew by {peak_gib:.2f} GiB"
    assert err < 1e-4
