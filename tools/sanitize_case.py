"""A small CUDA workload for compute-sanitizer: the fused masked-cell ops (forward and backward)
and one short RIM forward+backward on each CUDA backend."""

import torch

import rims_fast
from rims_fast.masked_cell import masked_gru_cell, masked_lstm_cell

torch.manual_seed(0)
dev = "cuda"
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
torch.cuda.synchronize()
print("sanitize_case: ok")
