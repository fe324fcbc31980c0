"""The window maths (nuwa_kernels.window) against the contract's worked examples and the oracle."""

from __future__ import annotations

import itertools

import pytest
import torch

from nuwa_kernels import window
from oracle import oracle_axis_keys, oracle_mask

# Contract section 3, one axis of length 8, self-attention: (k, causal, shift) -> windows.
WORKED = {
    (3, False, False): "0-1 0-2 1-3 2-4 3-5 4-6 5-7 6-7",
    (3, False, True): "0-2 0-2 1-3 2-4 3-5 4-6 5-7 5-7",
    (4, False, False): "0-1 0-2 0-3 1-4 2-5 3-6 4-7 5-7",
    (4, False, True): "0-3 0-3 0-3 1-4 2-5 3-6 4-7 4-7",
    (3, True, False): "0-0 0-1 0-2 1-3 2-4 3-5 4-6 5-7",
    (3, True, True): "0-0 0-1 0-2 1-3 2-4 3-5 4-6 5-7",
}


@pytest.mark.parametrize("setting", list(WORKED), ids=lambda s: f"k{s[0]}-{'causal' if s[1] else 'shift' if s[2] else 'truncate'}")
def test_worked_examples(setting):
    k, causal, shift = setting
    expected = [tuple(int(x) for x in w.split("-")) for w in WORKED[setting].split()]
    got = [window.axis_window(i, 8, 8, k, causal, shift) for i in range(8)]
    assert got == expected
    lo, hi = window.axis_bounds(8, 8, k, causal, shift)
    assert list(zip(lo.tolist(), hi.tolist())) == expected


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_none_is_whole_axis(shift, causal):
    for lq, lk in [(8, 8), (5, 3), (3, 7), (1, 1)]:
        (k,) = window.normalize_kernel_size((None, 1, 1), (lk, 1, 1))[:1]
        for i in range(lq):
            lo, hi = window.axis_window(i, lq, lk, k, causal, shift)
            c = (i * lk) // lq
            assert (lo, hi) == ((0, c) if causal else (0, lk - 1))


AXIS_CASES = [
    (lq, lk, k, causal, shift)
    for lq, lk in [(8, 8), (7, 3), (3, 7), (5, 5), (1, 4), (4, 1), (6, 4)]
    for k in (1, 2, 3, 4, 5, 9, None)
    for causal in (False, True)
    for shift in (False, True)
]


@pytest.mark.parametrize("case", AXIS_CASES, ids=lambda c: "L{}-{}-k{}-{}{}".format(c[0], c[1], c[2], "c" if c[3] else "n", "s" if c[4] else "t"))
def test_axis_window_matches_oracle(case):
    lq, lk, k, causal, shift = case
    border = "shift" if shift else "truncate"
    kn = window.normalize_kernel_size((k, 1, 1), (lk, 1, 1))[0]
    for i in range(lq):
        keys = oracle_axis_keys(i, lq, lk, k, causal, border)
        assert window.axis_window(i, lq, lk, kn, causal, shift) == (min(keys), max(keys))
    # the inverse window is exactly the set of queries whose window holds each key
    for j in range(lk):
        queries = [i for i in range(lq) if j in oracle_axis_keys(i, lq, lk, k, causal, border)]
        first, last = window.axis_inverse_window(j, lq, lk, kn, causal, shift)
        assert list(range(first, last + 1)) == queries


@pytest.mark.parametrize(
    "q_grid,kv_grid,ks,causal,border",
    [
        ((2, 3, 4), (2, 3, 4), 3, True, "truncate"),
        ((2, 3, 4), (2, 3, 4), (2, None, 3), (True, False, True), "shift"),
        ((4, 2, 5), (2, 3, 3), (1, 2, 3), False, "truncate"),
        ((3, 3, 3), (3, 3, 3), (3, 3, 3), (False, True, False), "shift"),
    ],
)
def test_window_mask_matches_oracle(q_grid, kv_grid, ks, causal, border):
    spec = window.make_window_spec(q_grid, kv_grid, ks, causal, border)
    assert torch.equal(window.window_mask(spec), oracle_mask(q_grid, kv_grid, ks, causal, border))


def test_every_query_sees_a_key():
    for q_grid, kv_grid in [((3, 4, 5), (3, 4, 5)), ((5, 2, 7), (2, 3, 3))]:
        for ks, causal, border in itertools.product([1, 2, (4, 1, None)], [False, (True, True, True)], ["truncate", "shift"]):
            spec = window.make_window_spec(q_grid, kv_grid, ks, causal, border)
            assert window.window_mask(spec).any(dim=1).all()
