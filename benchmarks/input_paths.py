"""The CPU driver's input term, measured: ``rim_cpu`` runs the pre-projected op with the input
elements and the fold ``input_value_n weight_ih[k]_n`` as its ``weight_ih`` (one batched matmul
per call, :func:`rims_fast.rim_cpu.input_fold`), for every ``T``. This times it side by side
in one process with the alternative it replaced, over a grid of ``T`` and ``B`` at the paper
layer (forward, no grad): the pre-projected op on the values ``x input_value`` with ``weight_ih``
in place (which the earlier cost model picked for short calls, at the price of a ``T``-dependent
summation order).

    python -m benchmarks.input_paths --threads 2 > benchmarks/results/<cpu>-input-paths.md
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
        raise SystemExit(f"input_paths: the C++ driver is not available: {why}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rim = rims_fast.RIM(64, 100, 6, 4, backend="cpu")
    P, cfg = dict(rim.named_parameters()), rim.config
    print("# rim_cpu input term: two ways side by side (paper layer D=64, K=6, top_k=4, H=100)\n")
    print(f"{_cpu_name()}, {args.threads} threads, torch "
          f"{torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          "forward without grad, float32, µs, min over 5 runs of 10 calls. `rim_cpu`: the "
          "pre-projected op on x with the fold made by one matmul per call (what "
          "`backend=\"cpu\"` runs); `values`: the pre-projected op on x input_value, "
          "weight_ih in place.\n")
    print("| B | T | rim_cpu | values | values / rim_cpu |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for B in map(int, args.B.split(",")):
        for T in map(int, args.T.split(",")):
            x = torch.randn(T, B, 1, 64)
            h, c = torch.zeros(B, 6, 100), torch.zeros(B, 6, 100)
            with torch.no_grad():
                t_new = _time(lambda: rc.rim_cpu(x, h, c, P, cfg))
                t_val = _time(lambda: rc.rim_cpu_kv(x @ P["input_key"], x @ P["input_value"], h,
                                                    c, P, cfg))
            print(f"| {B} | {T} | {t_new:.0f} | {t_val:.0f} | {t_val / t_new:.2f} |")


if __name__ == "__main__":
    main()
