"""One RIM forward (and optionally backward) in bfloat16, for Nsight Compute (`ncu`;
tools/gpu_session.sh's ``ncu`` stage): by default the persistent kernels at the `paper` shape; with
``--stepped`` the stepped ops, with ``--fused`` their fused kernels (``RIMS_FAST_CUDA_FUSED=1``),
with ``--large`` the `large` shape. The first call warms up (builds the kernels' attributes,
allocates); profile with ``--launch-skip 1 --launch-count 1`` and a kernel-name filter
(``rim_seq_fwd``, ``rim_seq_bwd``, ``GatesCellPhase``, ``OutputResidualPhase``...).

    python tools/profile_case.py [--mma | --cluster] [--tile N] [--backward]
    python tools/profile_case.py --fused [--large]
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
ap.add_argument("--stepped", action="store_true", help="RIMS_FAST_CUDA_FWD=stepped (the stepped ops)")
ap.add_argument("--fused", action="store_true",
                help="the stepped ops with RIMS_FAST_CUDA_FUSED=1 (implies --stepped)")
ap.add_argument("--large", action="store_true",
                help="the `large` shape (B=256 T=512 D=512 K=8 top_k=4 H=256) instead of `paper`")
args = ap.parse_args()
stepped = args.stepped or args.fused
if stepped and (args.mma or args.cluster or args.tile):
    ap.error("--mma, --cluster and --tile are options of the persistent kernels, not --stepped")
os.environ.update(RIMS_FAST_CUDA_FWD="stepped" if stepped else "persistent",
                  RIMS_FAST_CUDA_FUSED=str(int(args.fused)), RIMS_FAST_CUDA_MMA=str(int(args.mma)),
                  RIMS_FAST_CUDA_CLUSTER=str(int(args.cluster)),
                  RIMS_FAST_CUDA_TILE=str(args.tile))
D, H, K, top_k, T, B = (512, 256, 8, 4, 512, 256) if args.large else (64, 100, 6, 4, 100, 64)
torch.manual_seed(0)
rim = rims_fast.RIM(D, H, K, top_k, backend="cuda", device="cuda", dtype=torch.bfloat16)
x = torch.randn(T, B, D, device="cuda", dtype=torch.bfloat16, requires_grad=args.backward)
for _ in range(2):
    with torch.set_grad_enabled(args.backward):
        out, _ = rim(x)
        if args.backward:
            out.float().square().mean().backward()
torch.cuda.synchronize()
print("profile_case: ok", rim.last_backend)
