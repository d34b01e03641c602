"""Compile every Triton kernel of ``backend="triton"`` for a GPU target without a GPU, at real shapes,
and report what each needs: registers, spilled bytes, shared memory.

The interpreter (``TRITON_INTERPRET=1``, the CPU tests) checks the kernels' arithmetic but never
compiles them, so a kernel that does not compile for a GPU, or asks for more shared memory than a
block may have (Triton then fails at launch: "out of resources"), passes every CPU test. This tool
runs the real launch path — ``rims_fast.rim_triton``'s forward (fused and tiled, with and without
saving) and its backward sweep — on ``meta`` tensors of a benchmark config's shapes, with
``JITFunction.run`` replaced by a recorder: no kernel runs, each launch's arguments are recorded.
Each distinct launch is then compiled with ``triton.compile`` for the target (ptxas included in
Triton's wheel) and its cubin's resource usage read with Triton's bundled ``cuobjdump``.

    python tools/triton_resources.py                        # paper and large, bf16 and fp32, sm_90
    python tools/triton_resources.py --configs large --dtypes bf16 --cells lstm --arch 80
    python tools/triton_resources.py --configs large --kernels query,gates,qkv --json r.json
    python tools/triton_resources.py --host-overhead --dtypes bf16 --cells lstm   # no compile

``--host-overhead`` instead times the eager forward's own Python per step with every launch a
no-op (``host_overhead``): what the launch loop costs besides Triton's launch itself.

Exit status 1 if a kernel fails to compile or needs more shared memory than the target allows.
Must run without ``TRITON_INTERPRET`` (the kernels are then JIT functions, not interpreted ones).
The launch's specialization is reproduced (16-byte aligned pointers, integers divisible by 16,
integers equal to 1 as constants: ``_sig``); the pointers' alignment is assumed rather than read
(``meta`` tensors have no address).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("tools/triton_resources.py compiles kernels: unset TRITON_INTERPRET")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from benchmarks.configs import CONFIGS  # noqa: E402
from rims_fast import rim_triton as rt  # noqa: E402
from rims_fast._config import RimConfig  # noqa: E402

#: Largest dynamic shared memory per block, bytes (opt-in maximum): sm_90 227 KB, sm_80 163 KB.
SMEM_MAX = {90: 232448, 80: 166912}
_PTR = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8",
        torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def recording():
    """Within: every ``kernel[grid](...)`` appends ``(fn, bound args, options)`` instead of
    launching."""
    launches = []
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        opts = {k: v for k, v in kwargs.items() if k not in self.arg_names}
        launches.append((self, bound, opts))

    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = orig


def _sig(fn: JITFunction, bound: dict) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attributes as a launch specializes them: a tensor's pointer is
    16-byte aligned (a fresh allocation is; the per-step slices the launchers pass are at offsets
    of whole ``(B, K, H)`` float32 blocks, aligned at the benchmark shapes), an integer divisible
    by 16 gets that divisibility and an integer equal to 1 becomes a constant, unless the
    parameter is ``do_not_specialize``. Without these hints a half-precision load is one 2-byte
    element: neither vectorised nor pipelined, unlike what a GPU launch compiles."""
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound[p.name]
        spec = not p.do_not_specialize
        if p.is_constexpr or (spec and isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[p.name] = "constexpr"
            const[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _PTR[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if spec and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v)}")
    return sig, const, attrs


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resources(cubin: bytes, tmp: Path) -> dict:
    """``REG``, ``STACK`` (spills and local arrays, bytes per thread), static ``SHARED``."""
    f = tmp / "k.cubin"
    f.write_bytes(cubin)
    out = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(f)], capture_output=True,
                         text=True, check=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    return {kv.split(":")[0]: int(kv.split(":")[1]) for kv in line.split() if ":" in kv
            and kv.split(":")[1].isdigit()}


def meta_inputs(cfg_name: str, dtype: torch.dtype, cell: str, T: int):
    """``cfg, x, h0, c0, params`` of this benchmark config's shapes (``T`` steps), on meta
    tensors."""
    c = CONFIGS[cfg_name]
    cfg = RimConfig(input_size=c.D, hidden_size=c.H, num_units=c.K, top_k=c.top_k, cell=cell)
    meta = dict(device="meta", dtype=dtype)
    K, H = c.K, c.H
    shapes = {"input_key": (c.D, cfg.input_heads * cfg.input_key_size),
              "input_value": (c.D, cfg.input_heads * cfg.input_value_size),
              "input_query": (K, H, cfg.input_heads * cfg.input_key_size),
              "weight_ih": (K, cfg.input_heads * cfg.input_value_size, cfg.gates * H),
              "weight_hh": (K, H, cfg.gates * H), "bias_ih": (K, cfg.gates * H),
              "bias_hh": (K, cfg.gates * H),
              "comm_query": (K, H, cfg.comm_heads * cfg.comm_key_size),
              "comm_key": (K, H, cfg.comm_heads * cfg.comm_key_size),
              "comm_value": (K, H, cfg.comm_heads * cfg.comm_value_size),
              "comm_output": (K, cfg.comm_heads * cfg.comm_value_size, H)}
    P = [torch.empty(shapes[n], **meta) for n in rt.PARAM_NAMES]
    x = torch.empty(T, c.B, c.M, c.D, **meta)
    h0 = torch.empty(c.B, K, H, **meta)
    c0 = torch.empty(c.B, K, H, **meta) if cell == "lstm" else None
    return cfg, x, h0, c0, P


@contextmanager
def fwd_mode(mode: str):
    """``RIMS_FAST_TRITON_FWD=mode`` within, the caller's value restored after."""
    old = os.environ.get("RIMS_FAST_TRITON_FWD")
    os.environ["RIMS_FAST_TRITON_FWD"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RIMS_FAST_TRITON_FWD", None)
        else:
            os.environ["RIMS_FAST_TRITON_FWD"] = old


def launches_for(cfg_name: str, dtype: torch.dtype, cell: str, T: int = 2) -> list:
    """The launches of a forward (fused, tiled; saving, with dropout) and of the backward sweep at
    this benchmark config's shapes (``T`` steps), on meta tensors."""
    cfg, x, h0, c0, P = meta_inputs(cfg_name, dtype, cell, T)
    drop = dataclasses.replace(cfg, input_dropout=0.1, comm_dropout=0.1)
    with recording() as rec:
        for mode in ("fused", "tiled"):
            with fwd_mode(mode):
                rt._forward(x, h0, c0, P, cfg, 0.0, 0.0, 0, save=False)
                res = rt._forward(x, h0, c0, P, drop, 0.1, 0.1, 0, save=True)
        out, h_n, c_n, masks, *saved = res
        rt._backward_sweep(drop, True, 0, torch.empty_like(out), torch.empty_like(h_n),
                           torch.empty_like(c_n) if cell == "lstm" else None, x, h0, c0, P,
                           masks, saved)
    return rec


def host_overhead(cfg_name: str, dtype: torch.dtype, cell: str, T: int = 100,
                  reps: int = 7) -> dict:
    """Microseconds of host (Python) time per step of the no-grad forward, fused and tiled, with
    every ``JITFunction.run`` a no-op: what the eager loop costs besides Triton's own launch
    (argument binding, specialization key, driver call), which needs a GPU. Best of ``reps``."""
    import time
    cfg, x, h0, c0, P = meta_inputs(cfg_name, dtype, cell, T)
    orig, res = JITFunction.run, {}
    JITFunction.run = lambda self, *a, **k: None
    try:
        for mode in ("fused", "tiled"):
            with fwd_mode(mode):
                rt._forward(x, h0, c0, P, cfg, 0.0, 0.0, 0, save=False)  # warm-up
                best = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    rt._forward(x, h0, c0, P, cfg, 0.0, 0.0, 0, save=False)
                    best = min(best, time.perf_counter() - t0)
            res[mode] = best / T * 1e6
    finally:
        JITFunction.run = orig
    return res


def compile_all(rec: list, arch: int, tmp: Path, only=None) -> list[dict]:
    """Compile each distinct launch of ``rec`` for ``sm_<arch>`` (``only``: kernels whose name
    contains one of these strings); one row per kernel variant."""
    rows, seen = [], set()
    for fn, bound, opts in rec:
        if only and not any(s in fn.__name__ for s in only):
            continue
        sig, const, attrs = _sig(fn, bound)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(map(str, const.items()))),
               tuple(sorted(opts.items())))
        if key in seen:
            continue
        seen.add(key)
        row = {"kernel": fn.__name__, "const": {k: v for k, v in const.items()
                                                 if k.endswith(("_P", "BLOCK_B", "BLOCK_U", "SAVE",
                                                                "HAS_DROP", "IS_LSTM"))},
               "warps": opts.get("num_warps", 4)}
        try:
            ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32),
                                options={k: v for k, v in opts.items()
                                         if k in ("num_warps", "num_stages")})
            r = resources(ck.asm["cubin"], tmp)
            row.update(regs=r.get("REG"), stack=r.get("STACK", 0) + r.get("LOCAL", 0),
                       smem=ck.metadata.shared + r.get("SHARED", 0), error=None)
            if row["smem"] > SMEM_MAX[arch]:
                row["error"] = f"shared memory {row['smem']} B > {SMEM_MAX[arch]} B"
        except Exception as e:  # noqa: BLE001 - reported per kernel
            row.update(regs=None, stack=None, smem=None,
                       error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="paper,large")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_MAX))
    ap.add_argument("--kernels", default="", help="only kernels whose name contains one of these "
                    "comma-separated strings")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--host-overhead", action="store_true", help="instead: the forward's host "
                    "time per step with launches stubbed (no compile), per config, dtype, cell")
    args = ap.parse_args(argv)
    if args.host_overhead:
        print("| config | dtype | cell | fused µs/step | tiled µs/step |\n| --- | --- | --- | ---: | ---: |")
        for name in args.configs.split(","):
            for dt in args.dtypes.split(","):
                for cell in args.cells.split(","):
                    r = host_overhead(name, DTYPES[dt], cell)
                    print(f"| {name} | {dt} | {cell} | {r['fused']:.1f} | {r['tiled']:.1f} |")
        return 0
    only = [s for s in args.kernels.split(",") if s]
    allrows = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"triton_resources_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        sha = ""
    print(f"Triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}, git "
          f"{sha or 'unknown'}; `python tools/triton_resources.py {' '.join(argv or sys.argv[1:])}`"
          "; registers per thread, stack (spills, bytes per thread), shared memory per block\n")
    print("| config | dtype | cell | kernel | warps | tiles | regs | stack B | smem B | |")
    print("| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- |")
    bad = 0
    for name in args.configs.split(","):
        for dt in args.dtypes.split(","):
            for cell in args.cells.split(","):
                for row in compile_all(launches_for(name, DTYPES[dt], cell), args.arch, tmp,
                                       only):
                    allrows.append(dict(row, config=name, dtype=dt, cell=cell, arch=args.arch))
                    tiles = " ".join(f"{k}={v}" for k, v in row["const"].items())
                    bad += row["error"] is not None
                    print(f"| {name} | {dt} | {cell} | {row['kernel']} | {row['warps']} | {tiles} "
                          f"| {row['regs']} | {row['stack']} | {row['smem']} | "
                          f"{row['error'] or 'ok'} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"triton": triton.__version__, "torch": torch.__version__,
             "rows": [dict(r, const={k: str(v) for k, v in r["const"].items()})
                      for r in allrows]}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
