"""The host runs' cases of the CUDA ops, shared by tools/host_bitcheck.py (bit-identity across a
rebuild) and tests/test_host_item_order.py (bit-identity across the host item orders).

Covers rims_fast::rim_seq_fwd (all 13 outputs, saved histories included) over tiles 1 and 3,
the tensor-core tiling, clusters with and without resident weights, both input-term paths,
both dropouts, LSTM and GRU, per-head and folded input terms, float32 and float64; every
gradient of the persistent path (rim_seq_bwd and the weight-gradient GEMMs) over test_rim_seq's
GRID x block_inactive_grad x dropout; and the stepped ops (rims_fast::rim_steps_fwd / _bwd), also
with the fused kernels.
Each case is (key, run): run() returns the case's output tensors.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch

import test_rim_seq as T
from rims_fast import rim_seq as rs


def _cast(args, dtype):
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def persistent_forward_cases():
    for cell, dv, (pi, pc), dtype in itertools.product(
            ["lstm", "gru"], [3, 16], [(0.0, 0.0), (0.3, 0.4)], [torch.float64, torch.float32]):
        args = list(_cast(T._op_args(cell, pi, pc, dv=dv), dtype))
        for tile, mma, cluster, resident, xw in [
                (1, False, 0, -1, 0), (3, False, 0, -1, 0), (1, False, 0, -1, 1),
                (3, False, 0, -1, 1), (3, True, 0, -1, 0), (1, True, 0, -1, 0),
                (3, False, 2, -1, 0), (3, False, 2, 0, 1), (1, False, 1, -1, 1)]:
            a = args[:-2] + [tile, args[-1]]  # ..., seed, tile, save
            key = f"fwd-{cell}-{dv}-{pi}-{dtype}-{tile}-{mma}-{cluster}-{resident}-{xw}"
            yield key, lambda a=a, m=mma, c=cluster, r=resident, x=xw: \
                torch.ops.rims_fast.rim_seq_fwd(*a, m, c, r, x)


def _grad_case(case, stepped, dtype=torch.float64, big=False, drop=0.0, setup=None, **kw):
    rim, x, h0, c0, P, leaves = T._setup(*case, dtype=dtype, block_inactive_grad=big,
                                         input_dropout=drop, comm_dropout=drop, **(setup or {}))
    got = rs.rim_seq(x, h0, c0, P, rim.config, stepped=stepped, training=True, seed=5, **kw)
    g = T._grads(got[:3], leaves)
    return [t for t in got if t is not None] + list(g.values())


def gradient_cases():
    for case, big, drop in itertools.product(T.GRID, (False, True), (0.0, 0.3)):
        for tile, mma, xw in [(1, False, 0), (3, False, 1), (3, True, 0), (1, False, 1)]:
            yield (f"bwd-{case}-{big}-{tile}-{mma}-{xw}-{drop}",
                   lambda c=case, b=big, d=drop, t=tile, m=mma, x=xw: _grad_case(
                       c, False, big=b, drop=d, tile=t, mma=m, xw=x, cluster=0))
    for case, drop, dtype in itertools.product(T.GRID, (0.0, 0.3), (torch.float64, torch.float32)):
        yield (f"steps-{case}-{drop}-{dtype}",
               lambda c=case, d=drop, dt=dtype: _grad_case(c, True, dtype=dt, drop=d))


def wide_cases():
    """test_rim_seq's WIDE layers: phases of hundreds of items, tile 8 over a full and a partial
    tile."""
    for case, drop in itertools.product(T.WIDE, (0.0, 0.3)):
        for tile, mma, xw in [(8, False, 0), (8, False, 1), (8, True, 0), (1, False, 1)]:
            yield (f"wide-{case}-{tile}-{mma}-{xw}-{drop}",
                   lambda c=case, d=drop, t=tile, m=mma, x=xw: _grad_case(
                       c, False, drop=d, setup=T.WIDE_SETUP, tile=t, mma=m, xw=x, cluster=0))
        yield (f"wide-steps-{case}-{drop}",
               lambda c=case, d=drop: _grad_case(c, True, drop=d, setup=T.WIDE_SETUP))


# Layers for the fused kernels (RIMS_FAST_CUDA_FUSED=1: gates + LSTM cell, output + residual):
# the grid's (GRU: the output kernel only); H = 70 (nine 8-unit gate tiles: two blocks per
# mechanism, the second with one busy warp; three 32-unit output tiles, the last partial) over
# B = 19 (three 8-sample tiles, the last partial), H + XW = 75 padded to 80; and B = 70 (a block of
# 64 samples and one of 6), LSTM and GRU.
FUSED = T.GRID + [("lstm", 1, 1, 2, 3, 2, 3, 8), ("lstm", 1, 1, 1, 4, 2, 3, 8),
                  ("gru", 1, 1, 1, 4, 2, 3, 8)]
FUSED_SETUP = [{}] * len(T.GRID) + [dict(hidden_size=70, B=19), dict(B=70),
                                    dict(B=70, hidden_size=40, comm_value_size=24)]


@contextlib.contextmanager
def fused(on: bool = True):
    """RIMS_FAST_CUDA_FUSED set around a block (the stepped ops read it at each call)."""
    old = os.environ.get("RIMS_FAST_CUDA_FUSED")
    os.environ["RIMS_FAST_CUDA_FUSED"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["RIMS_FAST_CUDA_FUSED"]
        else:
            os.environ["RIMS_FAST_CUDA_FUSED"] = old


def _fused_case(case, setup, drop, dtype):
    with fused():
        return _grad_case(case, True, dtype=dtype, drop=drop, setup=setup)


def fused_cases():
    """The stepped forward with the fused kernels, and the stepped backward after it."""
    for (case, setup), drop, dtype in itertools.product(
            zip(FUSED, FUSED_SETUP), (0.0, 0.3), (torch.float64, torch.float32)):
        yield (f"fused-{case}-{setup}-{drop}-{dtype}",
               lambda c=case, s=setup, d=drop, dt=dtype: _fused_case(c, s, d, dt))


def collect(cases=None) -> dict[str, list[torch.Tensor]]:
    if cases is None:
        cases = itertools.chain(persistent_forward_cases(), gradient_cases(), wide_cases(),
                                fused_cases())
    return {key: [t.detach().clone() for t in run()] for key, run in cases}
