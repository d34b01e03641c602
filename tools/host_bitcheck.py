"""Bit-identity of the CUDA ops' host runs across a kernel change that should not move a bit.

The persistent and stepped kernels' tile functions run on the host in CI (HostExec). A change
that only reorganises work (splits a phase into more items, stages operands in shared memory)
must keep every result bit for bit: save the outputs before the change, rebuild, check after.

    python tools/host_bitcheck.py save /tmp/before.pt     # with the old build
    python tools/host_bitcheck.py check /tmp/before.pt    # with the new one

Covers rims_fast::rim_seq_fwd (all 13 outputs, saved histories included) over tiles 1 and 3,
the tensor-core tiling, clusters with and without resident weights, both input-term paths,
both dropouts, LSTM and GRU, per-head and folded input terms, float32 and float64; every
gradient of the persistent path (rim_seq_bwd and the weight-gradient GEMMs) over tests'
GRID x block_inactive_grad x dropout; and the stepped ops (rims_fast::rim_steps_fwd / _bwd).
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import test_rim_seq as T  # noqa: E402  (the tests' layer factories)

from rims_fast import rim_seq as rs  # noqa: E402


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


def _grad_case(case, stepped, dtype=torch.float64, big=False, drop=0.0, **kw):
    rim, x, h0, c0, P, leaves = T._setup(*case, dtype=dtype, block_inactive_grad=big,
                                         input_dropout=drop, comm_dropout=drop)
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


def collect() -> dict[str, list[torch.Tensor]]:
    cases = itertools.chain(persistent_forward_cases(), gradient_cases())
    return {key: [t.detach().clone() for t in run()] for key, run in cases}


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "check"):
        raise SystemExit(__doc__)
    mode, path = sys.argv[1:]
    res = collect()
    if mode == "save":
        torch.save(res, path)
        print(f"saved {len(res)} cases to {path}")
        return
    ref = torch.load(path)
    if ref.keys() != res.keys():
        raise SystemExit("the saved cases differ from this version's: regenerate with 'save'")
    bad = [(k, i) for k in ref for i, (a, b) in enumerate(zip(ref[k], res[k]))
           if a.shape != b.shape or not torch.equal(a, b)]
    for k, i in bad:
        print("DIFF", k, "output", i)
    print(f"checked {len(ref)} cases: {len(bad)} outputs differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
