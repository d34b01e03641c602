"""The CUDA kernels' warp items with their 32 lanes emulated on the host (csrc/kernels/host_exec.h).

A warp item of the persistent kernels (the attention scores and softmax, their backward, the
hoisted input term's d a~) and of the stepped ops (rim_step_select's scores, rim_step_comm's
scores and softmax, rim_step_comm_bwd's d scores and softmax backward) is written per lane: lane-strided loops, then warp_sum / warp_max and
syncwarp (csrc/kernels/warp_reduce.cuh). A default host run calls it once as lane 0 of 1, which
checks its arithmetic but not how the lanes split it. With ``_set_host_warp_lanes(32)`` each warp
phase runs on 32 host threads, one per lane, whose reductions combine as the device's shuffles
(the same butterfly): a shuffle some lanes skip, a value read from another lane before it is
written or a lane-strided loop that misses elements changes the results or hangs. The lanes
reassociate the dots, so the comparison with the one-lane run is to round-off (float64, the
tolerance table's row); the masks are compared exactly.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import host_cases
import test_rim_seq as T
from helpers import assert_close
from rims_fast import rim_seq as rs

_WHY = rs.unavailable_reason(torch.device("cpu"), torch.float64)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"rim_seq_fwd not built: {_WHY}")

# (cell, M, n_in, n_c, K, top_k, T, dv) as test_rim_seq.GRID, with head sizes: the GRID's
# (SMALL_HEADS: dots of 2..4 elements, most lanes idle) and wide ones, whose lane-strided loops
# wrap (dots of 34..40 elements on 32 lanes) and whose softmax over K = 34 keys gives lanes two.
WIDE = dict(input_key_size=40, comm_key_size=36, comm_value_size=34)
CASES = [
    (T.GRID[0], {}),
    (T.GRID[4], {}),
    (("lstm", 2, 2, 2, 34, 5, 2, 3), WIDE),
    (("gru", 1, 1, 1, 5, 2, 3, 8), WIDE),
]
# (tile, xw, cluster): both input-term paths (the hoisted one has the backward's d a~ warps), a
# multi-sample tile, and the cluster forward (its blocks are host threads, each with its lanes).
RUNS = [(1, 1, 0), (3, 0, 0), (3, 1, 2)]


@contextlib.contextmanager
def _lanes(n):
    from rims_fast import _C
    old = _C._set_host_warp_lanes(n)
    try:
        yield
    finally:
        _C._set_host_warp_lanes(old)


def _run(case, heads, tile, xw, cluster, dtype=torch.float64, lanes=1, stepped=False):
    rim, x, h0, c0, P, leaves = T._setup(*case, dtype=dtype, input_dropout=0.2, comm_dropout=0.3,
                                         **heads)
    cluster = max(cluster, -(-case[4] // 8)) if cluster else 0  # at most 8 blocks a cluster
    with _lanes(lanes):
        got = rs.rim_seq(x, h0, c0, P, rim.config, training=True, seed=11, tile=tile, xw=xw,
                         cluster=cluster, mma=False, stepped=stepped)
        grads = T._grads(got[:3], leaves)
    return got, grads


def _assert_close_runs(got, g_got, one, g_one):
    """Masks exactly; outputs and gradients to float64 round-off (the lanes reassociate)."""
    assert torch.equal(got[3], one[3]), "masks differ"
    for name, a, b in zip(("out", "h_n", "c_n"), got[:3], one[:3]):
        if b is not None:
            assert_close(name, a, b, torch.float64)
    for name in g_one:
        assert_close("d" + name, g_got[name], g_one[name], torch.float64,
                     "grad_w" if name in T.PARAMS else "grad_in")


@pytest.mark.parametrize("run", RUNS, ids=lambda r: "tile{}-xw{}-cluster{}".format(*r))
@pytest.mark.parametrize("case,heads", CASES, ids=lambda c: "-".join(map(str, c)) if
                         isinstance(c, tuple) else ("wide" if c else "small"))
def test_lanes_match_one_lane(case, heads, run):
    """Forward outputs, masks and every gradient with 32 emulated lanes against one lane."""
    one, g_one = _run(case, heads, *run)
    got, g_got = _run(case, heads, *run, lanes=32)
    _assert_close_runs(got, g_got, one, g_one)


@pytest.mark.parametrize("case,heads", CASES, ids=lambda c: "-".join(map(str, c)) if
                         isinstance(c, tuple) else ("wide" if c else "small"))
def test_stepped_lanes_match_one_lane(case, heads):
    """The stepped ops' warp items (rim_step_select's scores, rim_step_comm's scores and softmax,
    rim_step_comm_bwd's d scores and softmax backward): forward, masks and every gradient with
    32 emulated lanes against one lane."""
    one, g_one = _run(case, heads, 1, 0, 0, stepped=True)
    got, g_got = _run(case, heads, 1, 0, 0, lanes=32, stepped=True)
    _assert_close_runs(got, g_got, one, g_one)


# The tensor-core products (mma_rows.cuh, step_mma.cuh): on the host lane 0 computes a warp's
# 8 x 32 tile and every lane runs its share of the epilogue (bias, cell, residual, saving), so
# these check the epilogues' lane splitting, and the stepped ops' fused gates and output kernels.
@pytest.mark.parametrize("case", T.MMA_WIDE, ids=["lstm-H20-folded", "gru-H20-per_head"])
def test_mma_lanes_match_one_lane(case):
    *args, kw = case
    runs = []
    for lanes in (1, 32):
        rim, x, h0, c0, P, leaves = T._setup(*args, B=11, input_dropout=0.2, comm_dropout=0.3,
                                             **kw)
        with _lanes(lanes):
            got = rs.rim_seq(x, h0, c0, P, rim.config, training=True, seed=11, tile=3, mma=True)
            runs.append((got, T._grads(got[:3], leaves)))
    (one, g_one), (got, g_got) = runs
    _assert_close_runs(got, g_got, one, g_one)


@pytest.mark.parametrize("case,setup", list(zip(host_cases.FUSED, host_cases.FUSED_SETUP))[-3:],
                         ids=["lstm-H70", "lstm-B70", "gru-cv24"])
def test_fused_stepped_lanes_match_one_lane(case, setup):
    """The stepped forward's fused kernels, whose warp items are the products' epilogues (the
    select and comm kernels' warp items around them reassociate their dots: round-off), with
    every saved activation."""
    rim, x, h0, c0, P, _ = T._setup(*case, input_dropout=0.2, comm_dropout=0.3, **setup)
    outs = []
    for lanes in (1, 32):
        with _lanes(lanes), host_cases.fused(), torch.no_grad():
            outs.append(rs.rim_seq(x, h0, c0, P, rim.config, training=True, seed=5, stepped=True))
    assert torch.equal(outs[0][3], outs[1][3]), "masks differ"
    for i, (a, b) in enumerate(zip(*outs)):
        if b is not None and i != 3:
            assert_close(f"output {i}", a, b, torch.float64)


@pytest.mark.parametrize("stepped", [False, True], ids=["persistent", "stepped"])
def test_lanes_are_emulated(stepped):
    """The comparisons above would pass vacuously if the lanes never reached the kernels: in
    float32 the 32 lanes' butterfly sums the wide dots in another order than one lane's loop, so
    some output bits must differ."""
    case, heads = CASES[2]
    one, g_one = _run(case, heads, 1, 1, 0, dtype=torch.float32, stepped=stepped)
    got, g_got = _run(case, heads, 1, 1, 0, dtype=torch.float32, lanes=32, stepped=stepped)
    assert not torch.equal(got[0], one[0]) or any(
        not torch.equal(g_got[n], g_one[n]) for n in g_one)


def test_lanes_hook_checks_and_returns_previous():
    from rims_fast import _C
    assert _C._set_host_warp_lanes(32) == 1
    assert _C._set_host_warp_lanes(1) == 32
    with pytest.raises(RuntimeError, match="lanes must be 1 or 32"):
        _C._set_host_warp_lanes(4)
    assert _C._set_host_warp_lanes(1) == 1
