"""csrc/window.h (the C++/CUDA window maths) agrees with nuwa_kernels/window.py and the contract.

The compiled test hook ``nuwa_kernels::window_table(q_len, k_len, k, causal, shift)`` returns the
header's per-axis tables: ``window (q_len, 2)`` = ``(lo, hi)`` of every query coordinate and
``inverse (k_len, 2)`` = ``(first, last)`` of every key coordinate.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nuwa_kernels import _extension
from nuwa_kernels.window import axis_inverse_window, axis_window

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason=f"{_extension.LOAD_ERROR}")


def header_tables(lq: int, lk: int, k: int, causal: bool, shift: bool):
    win, inv = torch.ops.nuwa_kernels.window_table(lq, lk, k, causal, shift)
    return [tuple(r) for r in win.tolist()], [tuple(r) for r in inv.tolist()]


def python_tables(lq: int, lk: int, k: int, causal: bool, shift: bool):
    win = [axis_window(i, lq, lk, k, causal, shift) for i in range(lq)]
    inv = [axis_inverse_window(j, lq, lk, k, causal, shift) for j in range(lk)]
    return win, inv


def brute_inverse(win, lk: int):
    """(first, last) of the queries whose window holds key j, by scanning (empty: first > last)."""
    out = []
    for j in range(lk):
        qs = [i for i, (lo, hi) in enumerate(win) if lo <= j <= hi]
        out.append((qs[0], qs[-1]) if qs else None)
    return out


# The worked examples of docs/nearby_attention.md section 3 (one axis of length 8, self-attention).
WORKED = {
    "k3-truncate": (3, False, False, [(0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 7)]),
    "k3-shift": (3, False, True, [(0, 2), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (5, 7)]),
    "k4-truncate": (4, False, False, [(0, 1), (0, 2), (0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 7)]),
    "k4-shift": (4, False, True, [(0, 3), (0, 3), (0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (4, 7)]),
    "k3-causal": (3, True, False, [(0, 0), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7)]),
    "kNone-truncate": (15, False, False, [(0, 7)] * 8),
    "kNone-shift": (15, False, True, [(0, 7)] * 8),
    "kNone-causal": (15, True, False, [(0, i) for i in range(8)]),
}


@pytest.mark.parametrize("name", list(WORKED))
def test_worked_examples(name):
    k, causal, shift, expected = WORKED[name]
    win, inv = header_tables(8, 8, k, causal, shift)
    assert win == expected
    assert inv == brute_inverse(expected, 8)


LENGTHS = (1, 2, 3, 5, 8)
KERNELS = (1, 2, 3, 4, 7)


@pytest.mark.parametrize("causal,shift", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["truncate", "shift", "causal-truncate", "causal-shift"])
def test_header_equals_window_py(causal, shift):
    """Every (Lq, Lk, k) over small lengths, self- and cross-attention, plus k = None (2 Lk - 1)."""
    for lq, lk in itertools.product(LENGTHS + (11,), LENGTHS + (13,)):
        for k in KERNELS + (2 * lk - 1, lk, lk + 1):
            got = header_tables(lq, lk, k, causal, shift)
            want = python_tables(lq, lk, k, causal, shift)
            assert got == want, (lq, lk, k, causal, shift)


@pytest.mark.parametrize("lq,lk,k,causal,shift", [
    (21, 21, 7, False, False),
    (21, 10, 3, False, True),
    (10, 21, 4, True, False),
    (64, 3, 2, False, False),
    (3, 64, 5, False, True),
    (100, 100, 199, False, False),
], ids=["self-k7", "down-shift", "up-causal-even", "many-to-few", "few-to-many-shift", "none-100"])
def test_inverse_is_exact_preimage(lq, lk, k, causal, shift):
    """The header's inverse window is exactly the set of queries whose window holds the key."""
    win, inv = header_tables(lq, lk, k, causal, shift)
    assert win == python_tables(lq, lk, k, causal, shift)[0]
    for j, expect in enumerate(brute_inverse(win, lk)):
        first, last = inv[j]
        if expect is None:
            assert first > last
        else:
            assert (first, last) == expect


def test_bad_arguments_raise():
    with pytest.raises(RuntimeError, match="positive"):
        torch.ops.nuwa_kernels.window_table(4, 4, 0, False, False)
    with pytest.raises(RuntimeError, match=">= 0"):
        torch.ops.nuwa_kernels.window_table(-1, 4, 3, False, False)
