"""Where a step of the persistent CUDA kernels goes, phase by phase (GPU only).

Each persistent kernel runs a step as phases separated by block barriers. With a timing buffer
set (``rims_fast._C._set_phase_clock``), thread 0 of every block adds each phase's ``clock64()``
cycles into a counter per phase (``DeviceExec`` in ``csrc/rim_seq_cuda.cuh``). This prints, per
variant at a benchmark config in bf16, the mean cycles per step of each phase, its share of the
step, and that share of the kernel's measured time per step (``torch.profiler``: the kernel's
device time over T) — so the shares need no clock rate. Cycles are thread 0's view: a phase
ends for it at the barrier, when the block's slowest thread arrives.

    python tools/phase_clocks.py [--config paper] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The checkout's benchmarks/ (installed as rims_fast.benchmarks, not top-level).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import rims_fast  # noqa: E402
from benchmarks.configs import CONFIGS  # noqa: E402
from rims_fast import _C  # noqa: E402
from rims_fast import rim_seq as rs  # noqa: E402

SLOTS = 64  # per kernel (csrc/kernels/rim_seq_fwd.cuh, kPhaseSlots): phases, then block-steps

# Phase names in the kernels' order (csrc/kernels/rim_seq_fwd.cuh, rim_seq_bwd.cuh; CUDA cores,
# LSTM, no dropout). A variant whose count differs is printed by index.
FWD = ["1a queries (+ keys staged)", "1b scores, null softmax, p (warps)", "2 rank rule",
       "3a xa = a~ x", "3b gates", "3c cell", "4a comm Q|K|V",
       "4b comm scores + softmax (warps)", "4b comm read", "5 output + residual"]
BWD = ["5' d o (+ staging, dh' history)", "4' d b~ + softmax bwd (warps)", "4' dQ|dK|dV",
       "dh~ through Q|K|V", "3' cell bwd", "d gates history", "d xa through F^T",
       "1' d scores", "1' dq", "d keys", "d x", "dh_{t-1}", "dh, masks"]


def fwd_names(xw: bool, cluster: bool) -> list[str]:
    names = [n for n in FWD if not (xw and n.startswith("3a"))]
    if cluster:  # a cluster barrier after the scores (every p) and after Q|K|V (every K|V)
        names.insert(names.index("2 rank rule"), "cluster barrier (p)")
        names.insert(names.index("4b comm scores + softmax (warps)"), "cluster barrier (K|V)")
    return names


def bwd_names(xw: bool) -> list[str]:
    if not xw:
        return BWD
    names = [n for n in BWD if n != "d x"]
    names[names.index("d xa through F^T")] = "d a~ (hoisted term, warps)"
    return names


def kernel_us(prof, key: str) -> float:
    """Total device time (µs) of the kernels whose name contains key."""
    return sum(e.self_device_time_total for e in prof.key_averages() if key in e.key)


def report(title: str, counters: torch.Tensor, names: list[str], us_per_step: float) -> None:
    steps = int(counters[SLOTS - 1])
    cyc = counters[:SLOTS - 1].double() / max(steps, 1)
    n = int((cyc > 0).nonzero().max()) + 1 if (cyc > 0).any() else 0
    if n != len(names):
        names = [f"phase {i}" for i in range(n)]
    total = float(cyc[:n].sum())
    print(f"\n#### {title}: {us_per_step:.2f} µs per step (kernel time / T), "
          f"{total:.0f} cycles per block-step over {steps} block-steps\n")
    print("| phase | cycles per step | share | µs per step |")
    print("| --- | ---: | ---: | ---: |")
    for i in range(n):
        share = float(cyc[i]) / total if total else 0.0
        print(f"| {names[i]} | {float(cyc[i]):.0f} | {100 * share:.1f}% | {share * us_per_step:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="paper")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("phase_clocks: needs a CUDA device")
    c = CONFIGS[args.config]
    torch.manual_seed(0)
    dt = torch.bfloat16
    rim = rims_fast.RIM(c.D, c.H, c.K, c.top_k, backend="cuda", device="cuda", dtype=dt)
    P, cfg = dict(rim.named_parameters()), rim.config
    x = torch.randn(c.T, c.B, c.M, c.D, device="cuda", dtype=dt, requires_grad=True)
    h0 = torch.zeros(c.B, c.K, c.H, device="cuda", dtype=dt, requires_grad=True)
    c0 = torch.zeros_like(h0, requires_grad=True)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}, config {c.name} "
          f"({c.describe()}), bf16, CUDA cores; --reps {args.reps}")
    variants = [("hoisted input term (xw=1)", dict(xw=1, cluster=0), True),
                ("F read per step (xw=0)", dict(xw=0, cluster=0), True),
                ("cluster, one mechanism per block (xw=1)", dict(xw=1, cluster=1), False),
                # Clusters of two blocks at tile 1: the 512-thread tile-1 cluster kernel.
                ("clusters of two blocks, tile 1 (xw=1)",
                 dict(xw=1, cluster=-(-c.K // 2), tile=1), False),
                # Two samples per 512-thread block (RIMS_FAST_CUDA_TILE=2's forward).
                ("hoisted input term, tile 2 (xw=1)", dict(xw=1, cluster=0, tile=2), False)]
    for label, kw, with_bwd in variants:
        def run(grad: bool) -> None:
            with torch.set_grad_enabled(grad):
                out = rs.rim_seq(x, h0, c0, P, cfg, mma=False, stepped=False, **kw)
                if grad:
                    out[0].float().square().mean().backward()
        for grad in ([False, True] if with_bwd else [False]):
            run(grad)  # warm-up, untimed
            torch.cuda.synchronize()
            buf = torch.zeros(2 * SLOTS, dtype=torch.int64, device="cuda")
            _C._set_phase_clock(buf)
            try:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.reps):
                        run(grad)
                    torch.cuda.synchronize()
            finally:
                _C._set_phase_clock(None)
            fwd_key = "rim_seq_fwd_cluster_kernel" if kw["cluster"] else "rim_seq_fwd_kernel"
            per_step = lambda key: kernel_us(prof, key) / (args.reps * c.T)  # noqa: E731
            what = "fwd+bwd" if grad else "fwd (no grad)"
            report(f"{label}, {what}: forward kernel", buf[:SLOTS].cpu(),
                   fwd_names(kw["xw"] == 1, kw["cluster"] > 0), per_step(fwd_key))
            if grad:
                report(f"{label}, {what}: backward kernel", buf[SLOTS:].cpu(),
                       bwd_names(kw["xw"] == 1), per_step("rim_seq_bwd_kernel"))


if __name__ == "__main__":
    main()
