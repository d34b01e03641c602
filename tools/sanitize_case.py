"""A small CUDA workload for compute-sanitizer: the fused masked-cell ops (forward and backward),
one short RIM forward+backward on each CUDA backend, and the persistent whole-sequence kernel
(rims_fast::rim_seq_fwd and rim_seq_bwd, tiles of 1, 2 and 3 samples — the 512-thread kernels at
1 and, forward, 2 —, LSTM and GRU, with dropout;
the tensor-core variant; the hoisted input term; on sm_90+ the cluster forward), and the stepped ops
(rims_fast::rim_steps_fwd / rim_steps_bwd; also with RIMS_FAST_CUDA_PDL=1 and
RIMS_FAST_CUDA_FUSED=1). With
``--seq-only`` only the persistent kernel runs (for racecheck/synccheck, which are slow)."""

import os
import sys

import torch

import rims_fast
from rims_fast.masked_cell import masked_gru_cell, masked_lstm_cell

torch.manual_seed(0)
dev = "cuda"


def persistent_kernel():
    from rims_fast.rim_seq import rim_seq
    for cell in ("lstm", "gru"):
        rim = rims_fast.RIM(6, 5, 3, 2, cell=cell, input_heads=2, comm_heads=2, device=dev,
                            input_dropout=0.2, comm_dropout=0.2)
        x = torch.randn(4, 5, 2, 6, device=dev)
        h0 = torch.randn(5, 3, 5, device=dev)
        c0 = torch.randn(5, 3, 5, device=dev) if cell == "lstm" else None
        # Forward and the backward kernel; the forward with F read per step and hoisted (xw).
        for tile, xw in ((1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (3, 1)):
            out, h_n, c_n, _ = rim_seq(x.requires_grad_(True), h0, c0,
                                       dict(rim.named_parameters()), rim.config, training=True,
                                       seed=1, tile=tile, xw=xw)
            (out.square().sum() + h_n.sum()).backward()
        # The tensor-core kernels, forward and backward (bfloat16; H = 5, D = 6: every operand
        # padded).
        P16 = {n: p.detach().bfloat16().requires_grad_(True) for n, p in rim.named_parameters()}
        out, h_n, _, _ = rim_seq(x.detach().bfloat16(), h0.bfloat16(),
                                 c0.bfloat16() if c0 is not None else None, P16, rim.config,
                                 tile=3, mma=True)
        (out.float().square().sum() + h_n.float().sum()).backward()
        # The cluster forward (DSMEM), 2+1 blocks, weights in shared memory (as many as fit, the
        # default) and not.
        if torch.cuda.get_device_capability()[0] >= 9:
            out, h_n, _, _ = rim_seq(x.detach().requires_grad_(True), h0, c0,
                                     dict(rim.named_parameters()), rim.config, training=True,
                                     seed=1, tile=3, cluster=1)
            (out.square().sum() + h_n.sum()).backward()
            rim_seq(x.detach(), h0, c0, {n: p.detach() for n, p in rim.named_parameters()},
                    rim.config, tile=2, cluster=2)
            rim_seq(x.detach(), h0, c0, {n: p.detach() for n, p in rim.named_parameters()},
                    rim.config, tile=2, cluster=2, resident=0)
            rim_seq(x.detach(), h0, c0, {n: p.detach() for n, p in rim.named_parameters()},
                    rim.config, training=True, seed=1, tile=2, cluster=2, xw=1)
            # bfloat16 storage, float compute: the resident slots of both types (H = 5: GRU's
            # weight_hh takes 2 mod 4 bytes per mechanism, so the next slot's alignment matters).
            rim_seq(x.detach().bfloat16(), h0.bfloat16(),
                    c0.bfloat16() if c0 is not None else None,
                    {n: p.detach() for n, p in P16.items()}, rim.config, tile=2, cluster=2)
        # The stepped ops (rims_fast::rim_steps_fwd / rim_steps_bwd: cuBLAS and their phase
        # kernels), float32 with dropout, forward and backward, and bfloat16 (out_dtype GEMMs).
        out, h_n, _, _ = rim_seq(x.detach().requires_grad_(True), h0, c0,
                                 dict(rim.named_parameters()), rim.config, training=True, seed=1,
                                 stepped=True)
        (out.square().sum() + h_n.sum()).backward()
        rim_seq(x.detach().bfloat16(), h0.bfloat16(), c0.bfloat16() if c0 is not None else None,
                {n: p.detach() for n, p in P16.items()}, rim.config, stepped=True)
        # The same with programmatic dependent launch (sm_90+) and the fused kernels (H = 5: one
        # warp tile, 5 samples in one row tile, the gates' kd 11 -> 16, the output's cv 20 -> 32).
        env = {"RIMS_FAST_CUDA_PDL": "1" if torch.cuda.get_device_capability()[0] >= 9 else "0",
               "RIMS_FAST_CUDA_FUSED": "1"}
        os.environ.update(env)
        try:
            out, h_n, _, _ = rim_seq(x.detach().bfloat16(), h0.bfloat16(),
                                     c0.bfloat16() if c0 is not None else None, P16, rim.config,
                                     training=True, seed=1, stepped=True)
            (out.float().square().sum() + h_n.float().sum()).backward()
        finally:
            for k in env:
                del os.environ[k]
    torch.cuda.synchronize()


if "--seq-only" in sys.argv:
    persistent_kernel()
    print("sanitize_case --seq-only: ok")
    sys.exit(0)

B, K, H = 5, 3, 7
mask = torch.rand(B, K, device=dev) > 0.5
gates = torch.randn(B, K, 4 * H, device=dev, requires_grad=True)
h = torch.randn(B, K, H, device=dev, requires_grad=True)
c = torch.randn(B, K, H, device=dev, requires_grad=True)
hn, cn = masked_lstm_cell(gates, h, c, mask)
(hn.sum() + cn.square().sum()).backward()
gi = torch.randn(B, K, 3 * H, device=dev, requires_grad=True)
gh = torch.randn(B, K, 3 * H, device=dev, requires_grad=True)
masked_gru_cell(gi, gh, h, mask).square().sum().backward()
for backend in ("cuda", "triton"):
    for cell in ("lstm", "gru"):
        rim = rims_fast.RIM(6, 5, 3, 2, cell=cell, input_heads=2, comm_heads=2, backend=backend,
                            device=dev)
        out, _ = rim(torch.randn(3, 4, 2, 6, device=dev))
        out.square().sum().backward()
persistent_kernel()
torch.cuda.synchronize()
print("sanitize_case: ok")
