"""Where the stepped path's time goes: torch.profiler kernel table (count, total and mean device
time per kernel) for one no-grad forward and one forward+backward of ``RIM(backend="cuda")`` with
``RIMS_FAST_CUDA_FWD=stepped`` in bfloat16, at the benchmark configs `paper` and `large`.

    python tools/profile_steps.py [--configs paper,large] [--rows 20]
"""

import argparse
import os
import sys
from pathlib import Path

# The checkout's benchmarks/ (installed as rims_fast.benchmarks, not top-level).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import rims_fast  # noqa: E402
from benchmarks.configs import CONFIGS  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--configs", default="paper,large")
ap.add_argument("--rows", type=int, default=20)
args = ap.parse_args()
os.environ["RIMS_FAST_CUDA_FWD"] = "stepped"


def run(rim, x, grad):
    with torch.set_grad_enabled(grad):
        out, _ = rim(x)
        if grad:
            out.float().square().mean().backward()


def table(prof, rows):
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows,
                                     max_name_column_width=90)


for name in args.configs.split(","):
    c = CONFIGS[name]
    torch.manual_seed(0)
    rim = rims_fast.RIM(c.D, c.H, c.K, c.top_k, backend="cuda", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(c.T, c.B, c.D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for grad in (False, True):
        run(rim, x, grad)  # warm-up: cuBLAS handles and heuristics, allocations
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     record_shapes=True) as prof:
            run(rim, x, grad)
            torch.cuda.synchronize()
        print(f"##### {name} B{c.B} T{c.T} D{c.D} K{c.K}/{c.top_k} H{c.H} bf16 "
              f"{'fwd+bwd' if grad else 'fwd (no grad)'} ({rim.last_backend}); per step: divide by T={c.T}")
        print(table(prof, args.rows), flush=True)
        # The same by input shapes (ATen ops only, kernels have none): which tensors the copies,
        # conversions and weight-gradient products move.
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=40,
            max_shapes_column_width=110), flush=True)
