"""``rims-bench`` / ``python -m benchmarks``: time RIM providers against the reference and nn.LSTM.

For every config: build each provider on the same parameters, run the correctness gate (each RIM
provider's out/h_n/c_n/masks against :func:`rims_fast.rim_ref`; a provider that fails is reported
FAILED and not timed), then time each mode and measure peak memory. Prints a table and writes
``<results>/<device-slug>.json`` and ``.csv`` (and a sweep plot ``.png``). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # torch.profiler (CPU peak memory) stays quiet

import torch  # noqa: E402

import rims_fast  # noqa: E402

from . import flops, harness, report  # noqa: E402
from .configs import CONFIGS, SWEEPS, default_config_names, expand  # noqa: E402
from .providers import PROVIDERS, Context, Skip, build, make_reference  # noqa: E402

_HERE = Path(__file__).resolve().parent
#: benchmarks/results/ in a source checkout; ./rims-bench-results when installed (not site-packages).
RESULTS = (_HERE / "results" if (_HERE.parent / "pyproject.toml").is_file()
           else Path.cwd() / "rims-bench-results")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
          "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_COMPILE_REASON = ("not in the CPU default: compiling the unrolled T-step reference took ~140 s "
                      "for one shape (T=50) on a 2-core CPU and every shape recompiles; name it in "
                      "--providers to include it")


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="rims-bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configs: " + ", ".join(sorted(CONFIGS)) + "; sweeps: " + ", ".join(
            f"{k} ({', '.join(c.name.split(':')[1] for c in v)})" for k, v in SWEEPS.items()))
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, a few seconds: the gate and the table, for CI")
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--providers", type=_csv, default=None,
                    help=f"comma list of {','.join(PROVIDERS)} (default: all)")
    ap.add_argument("--configs", type=_csv, default=None,
                    help="comma list of configs/sweeps (default: CPU paper_T50,paper and sweep_T, sweep_B up to paper's T, B; "
                         "GPU paper,large,sweep_T,sweep_B,sweep_K,sweep_H; --smoke: smoke)")
    ap.add_argument("--modes", type=_csv, default=None, help="comma list of fwd,bwd,fwd+bwd (default: all)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions per provider (CPU default 5, --smoke 3; GPU: do_bench "
                         "chooses, this is used only for the CUDA-event fallback)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per provider first (CPU)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="GPU: time every provider this many times, the order rotated each round, "
                         "and report the median of the round medians, min ms the fastest round "
                         "(default 1; the CPU timing interleaves its repetitions anyway)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--baseline", default="lstm", help="provider the ratio column divides by")
    ap.add_argument("--compile-max-T", type=int, default=100,
                    help="skip torch_compile above this T (it unrolls the loop; default 100)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    ap.add_argument("--name", default=None, help="file stem (default: the device slug)")
    ap.add_argument("--no-save", action="store_true", help="print only; write no files")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    for p in args.providers or []:
        if p not in PROVIDERS:
            ap.error(f"unknown provider {p!r}; known: {', '.join(PROVIDERS)}")
    for m in args.modes or []:
        if m not in harness.MODES:
            ap.error(f"unknown mode {m!r}; known: {', '.join(harness.MODES)}")
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    return args


class _Progress:
    """tqdm when installed (optional), else one line per step."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass
        self.total, self.done = total, 0

    def log(self, msg: str):
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def step(self, desc: str):
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(desc[:60])
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _row(cfg, provider: str, mode: str, status: str, **kw) -> dict:
    r = {"provider": provider, "config": cfg.name, "group": cfg.group or cfg.name, "mode": mode,
         "status": status, "B": cfg.B, "T": cfg.T, "M": cfg.M, "D": cfg.D, "K": cfg.K,
         "top_k": cfg.top_k, "H": cfg.H, "reason": "", "gate": ""}
    r.update(kw)
    return r


def run_config(cfg, args, device, dtype, providers, modes, timer, prog: _Progress,
               skipped: dict) -> list[dict]:
    rows: list[dict] = []
    ref = make_reference(cfg, device, dtype)
    ctx = Context(cfg, device, dtype, ref, smoke=args.smoke, compile_max_T=args.compile_max_T,
                  allow_compile=args.allow_compile, compile_skip_reason=CPU_COMPILE_REASON)
    gen = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(cfg.T, cfg.B, cfg.M, cfg.D, generator=gen).to(device, dtype)
    grad_out = torch.randn(cfg.T, cfg.B, cfg.K * cfg.H, generator=gen).to(device, dtype)

    def skip(name, reason, status="skipped"):
        for mode in modes:
            rows.append(_row(cfg, name, mode, status, reason=reason))
        if status == "skipped":
            skipped.setdefault((name, reason), []).append(cfg.name)
        else:
            prog.log(f"{cfg.name}: {name} {status}: {reason}")

    built = {}
    for name in providers:
        try:
            built[name] = build(name, ctx)
        except Skip as e:
            skip(name, str(e))

    # Correctness gate: every RIM provider against rims_fast.rim_ref, same input and parameters.
    with torch.no_grad():
        zeros = x.new_zeros(cfg.B, cfg.K, cfg.H)
        params = dict(ref.named_parameters(recurse=False))
        expected = rims_fast.rim_ref(x, zeros, zeros, params, ref.config)
    gates, first = {}, {}
    for name in list(built):
        p = built[name]
        brim = isinstance(p.module, rims_fast.BRIM)
        if not p.is_rim and not brim:
            continue
        t0 = time.perf_counter()
        try:
            ok, detail = harness.gate_brim(p, x) if brim else harness.gate(p, x, ref, expected)
        except Exception as e:  # noqa: BLE001 - a provider that breaks is reported, not hidden
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            del built[name]
            if name == "torch_compile":
                skip(name, f"torch.compile failed: {msg}")
            else:
                skip(name, f"raised in the gate: {msg}", status="FAILED")
            continue
        first[name] = time.perf_counter() - t0
        gates[name] = ("passed: " if ok else "FAILED: ") + detail
        if not ok:
            del built[name]
            skip(name, f"correctness gate: {detail}", status="FAILED")
    if "torch_compile" in first:
        prog.log(f"{cfg.name}: torch_compile first call (compile, fwd) {first['torch_compile']:.1f} s")

    for mode in modes:
        calls = {n: harness.Call(p, mode, x, grad_out) for n, p in built.items()}
        firsts: dict[str, float] = {}
        times, errors = timer.run(calls, lambda n, s: firsts.__setitem__(n, s))
        for n, err in errors.items():
            rows.append(_row(cfg, n, mode, "FAILED", reason=f"raised while timed: {err}",
                             gate=gates.get(n, "")))
            prog.log(f"{cfg.name}/{mode}: {n} FAILED: {err}")
        for n, ts in times.items():
            med = harness.median(ts)
            peak = harness.measure_peak(calls[n], device)
            sf = flops.step_flops(cfg, n) if mode == "fwd" else None
            rows.append(_row(cfg, n, mode, "ok", median_ms=med * 1e3, min_ms=min(ts) * 1e3, n=len(ts),
                             ms_per_step=med * 1e3 / cfg.T, tokens_per_s=cfg.B * cfg.T / med,
                             step_tflops=None if sf is None else sf * cfg.T / med / 1e12,
                             peak_mem_bytes=peak, first_call_s=firsts.get(n),
                             gate=gates.get(n, "not a RIM: no gate")))
        del calls
        prog.step(f"{cfg.name} {mode}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _ratios(rows: list[dict], baseline: str):
    base = {(r["config"], r["mode"]): r["median_ms"] for r in rows
            if r["provider"] == baseline and r["status"] == "ok"}
    for r in rows:
        b = base.get((r["config"], r["mode"]))
        r["baseline"] = baseline
        r["ratio"] = r["median_ms"] / b if (r["status"] == "ok" and b) else None


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("rims-bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    providers = args.providers or list(PROVIDERS)
    modes = args.modes or list(harness.MODES)
    configs = expand(args.configs or default_config_names(device.type, args.smoke))
    # torch_compile on CPU only when asked for by name (see CPU_COMPILE_REASON).
    args.allow_compile = device.type == "cuda" or (args.providers is not None and "torch_compile" in args.providers)
    reps = args.reps or (3 if args.smoke else 5 if device.type == "cpu" else 20)
    timer = harness.Timer(device, reps=reps, warmup=args.warmup, rounds=args.rounds)
    env = report.environment(device, dtype, args.threads)
    env.update(timing=timer.method, memory=harness.mem_method(device), reps=reps,
               warmup=args.warmup, rounds=args.rounds, argv=sys.argv[1:] if argv is None else list(argv),
               fwd_mode="forward under torch.no_grad()",
               bwd_mode="backward alone of a recorded forward, random grad_output on out; grads into x and all parameters")

    print(f"rims-bench: {env['device']} | {env['dtype']} | threads {args.threads} | torch {env['torch']}"
          f" | triton {env['triton']} | git {env['git_sha']}")
    if device.type == "cuda":
        print(f"  CUDA {env['cuda']}, driver {env['driver']}, cuDNN {env['cudnn']}")
    load = env.get("loadavg_start")
    if device.type == "cpu" and load and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"  WARNING: this machine is busy (1-min load {load[0]} on {os.cpu_count()} cores): other "
              "processes share the cores, so CPU timings will be slow and noisy, worst with --threads "
              "equal to the core count")
    print(f"  timing: {timer.method}" + (f", {reps} reps after {args.warmup} warm-up" if device.type == "cpu" else ""))
    print(f"  peak memory: {env['memory']}")
    print(f"  configs: {', '.join(c.name for c in configs)}; modes: {', '.join(modes)}; "
          f"providers: {', '.join(providers)}", flush=True)

    prog = _Progress(len(configs) * len(modes), enabled=not args.no_progress)
    rows: list[dict] = []
    skipped: dict = {}
    done: dict = {}  # shape -> rows: a sweep point equal to a config already run is not re-timed
    interrupted = False
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # `timeout` still saves what ran
    try:
        for cfg in configs:
            if cfg.shape in done:
                for r in done[cfg.shape]:
                    rows.append(dict(r, config=cfg.name, group=cfg.group or cfg.name,
                                     reused_from=r["config"]))
                for _ in modes:
                    prog.step(f"{cfg.name} (same shape as {done[cfg.shape][0]['config']})")
                continue
            new = run_config(cfg, args, device, dtype, providers, modes, timer, prog, skipped)
            done[cfg.shape] = new
            rows.extend(new)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        prog.close()
        signal.signal(signal.SIGTERM, old_term)
    if interrupted:
        print("\nrims-bench: interrupted; reporting and saving the configs that finished", flush=True)
    _ratios(rows, args.baseline)
    wall = time.perf_counter() - t_start

    # Sweep points equal to a config above are in the files (for the plot) but not printed twice.
    shown = [r for r in rows if r["status"] != "skipped" and "reused_from" not in r]
    print()
    print(report.format_table(shown, baseline=args.baseline))
    if skipped:
        print("\nskipped:")
        for (name, reason), cfgs in skipped.items():
            where = "all configs" if len(cfgs) == len(done) else ", ".join(cfgs)
            print(f"  {name} ({where}): {reason}")
    failed = sorted({(r["provider"], r["config"]) for r in rows if r["status"] == "FAILED"})
    if failed:
        print("\nFAILED (not timed): " + ", ".join(f"{p} on {c}" for p, c in failed))
    if any("reused_from" in r for r in rows):
        print("\n(sweep points with the shape of a config above are not re-run or re-printed: "
              + ", ".join(sorted({f"{r['config']} = {r['reused_from']}" for r in rows if "reused_from" in r})) + ")")
    print(f"\nratio: median time / {args.baseline}'s median time (same config and mode); "
          f"tokens/s = B*T / median time; fwd = no_grad forward; peak mem: {env['memory']}")
    print(f"total wall time {wall:.1f} s")

    if not args.no_save:
        slug = args.name or report.device_slug(env)
        if args.name is None and dtype != torch.float32:
            slug += f"-{env['dtype']}"
        if args.name is None and args.smoke:
            slug += "-smoke"
        env["wall_s"] = round(wall, 1)
        env["interrupted"] = interrupted
        env["loadavg_end"] = report._loadavg()
        result = {"environment": env, "configs": [c.as_dict() for c in configs], "rows": rows,
                  "skipped": [{"provider": n, "reason": r, "configs": c} for (n, r), c in skipped.items()]}
        paths = report.save(result, args.out, slug)
        png = report.plot_sweeps(rows, args.out / f"{slug}.png",
                                 title=f"{env['device']}, {env['dtype']}, torch {env['torch']}")
        print("wrote " + ", ".join(str(p) for p in paths + ([png] if png else [])))
    return 130 if interrupted else 1 if failed else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
