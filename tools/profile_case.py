"""One persistent-kernel forward (and optionally backward) at the `paper` shape in bfloat16, for
Nsight Compute (`ncu`; tools/gpu_session.sh's ``ncu`` stage). The first call warms up (builds the
kernels' attributes, allocates); profile with ``--launch-skip 1 --launch-count 1``.

    python tools/profile_case.py [--mma | --cluster] [--tile N] [--backward]
"""

import argparse
import os

import torch

import rims_fast

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--mma", action="store_true", help="RIMS_FAST_CUDA_MMA=1 (tensor cores)")
ap.add_argument("--cluster", action="store_true",
                help="RIMS_FAST_CUDA_CLUSTER=1 (thread-block clusters, CUDA cores; forward only)")
ap.add_argument("--tile", type=int, default=0, help="RIMS_FAST_CUDA_TILE (0: automatic)")
ap.add_argument("--backward", action="store_true", help="also run the backward kernel")
args = ap.parse_args()
os.environ.update(RIMS_FAST_CUDA_FWD="persistent", RIMS_FAST_CUDA_MMA=str(int(args.mma)),
                  RIMS_FAST_CUDA_CLUSTER=str(int(args.cluster)),
                  RIMS_FAST_CUDA_TILE=str(args.tile))
torch.manual_seed(0)
rim = rims_fast.RIM(64, 100, 6, 4, backend="cuda", device="cuda", dtype=torch.bfloat16)
x = torch.randn(100, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=args.backward)
for _ in range(2):
    with torch.set_grad_enabled(args.backward):
        out, _ = rim(x)
        if args.backward:
            out.float().square().mean().backward()
torch.cuda.synchronize()
print("profile_case: ok", rim.last_backend)
