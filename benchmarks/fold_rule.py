"""The CPU driver's input-term choice, measured: ``rim_cpu`` runs the folded driver (a fold of
``input_value_n weight_ih[k]_n`` made at every call) or the pre-projected one (``weight_ih`` in
place) by a cost model, :func:`rims_fast.rim_cpu.fold_pays`. This times both paths side by side
in one process over a grid of ``T`` and ``B`` at the paper layer (forward, no grad) and prints a
markdown table with the model's pick, so the model's constant can be checked on a machine.

    python -m benchmarks.fold_rule --threads 2 > benchmarks/results/<cpu>-fold-rule.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

import rims_fast
from rims_fast import rim_cpu as rc


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time(f, reps: int = 5, n: int = 10) -> float:
    """Minimum over ``reps`` of the mean of ``n`` calls, in microseconds."""
    for _ in range(3):
        f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--B", default="1,4,16,64", help="comma list of batch sizes")
    ap.add_argument("--T", default="1,4,16,64", help="comma list of sequence lengths")
    args = ap.parse_args(argv)
    why = rc.unavailable_reason(torch.device("cpu"), torch.float32)
    if why is not None:
        raise SystemExit(f"fold_rule: the C++ driver is not available: {why}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rim = rims_fast.RIM(64, 100, 6, 4, backend="cpu")
    P, cfg = dict(rim.named_parameters()), rim.config
    model = rc.fold_pays
    print("# rim_cpu input term: folded vs pre-projected (paper layer D=64, K=6, top_k=4, H=100)\n")
    print(f"{_cpu_name()}, {args.threads} threads, torch "
          f"{torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          "forward without grad, float32, min over 5 runs of 10 calls.\n")
    print("| B | T | folded µs | pre-projected µs | pre-projected / folded | model picks |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    try:
        for B in map(int, args.B.split(",")):
            for T in map(int, args.T.split(",")):
                x = torch.randn(T, B, 1, 64)
                h, c = torch.zeros(B, 6, 100), torch.zeros(B, 6, 100)
                times = {}
                with torch.no_grad():
                    for path in ("folded", "kv"):
                        rc.fold_pays = lambda *a, _p=path, **k: _p == "folded"
                        times[path] = _time(lambda: rc.rim_cpu(x, h, c, P, cfg))
                rc.fold_pays = model
                pick = "folded" if model(T, B, 1, 64, cfg) else "pre-projected"
                print(f"| {B} | {T} | {times['folded']:.0f} | {times['kv']:.0f} | "
                      f"{times['kv'] / times['folded']:.2f} | {pick} |")
    finally:
        rc.fold_pays = model


if __name__ == "__main__":
    main()
