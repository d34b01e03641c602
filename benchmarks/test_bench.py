"""pytest-benchmark suite over the rims-bench providers, at small shapes.

    pytest benchmarks --benchmark-only          # timings (grouped by config and mode)
    pytest benchmarks --benchmark-disable       # each benchmarked call once: a quick check
    pytest benchmarks                           # both; bounded rounds, well under a minute on CPU

Each RIM provider must pass the same correctness gate as ``rims-bench`` before it is timed.
Providers that cannot run here are skipped with the reason. ``torch_compile`` compiles the
unrolled T-step loop (tens of seconds even at these shapes), so it runs only with
``RIMS_FAST_BENCH_COMPILE=1``. The device is CUDA when available, else CPU (2 threads).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import harness
from benchmarks.configs import CONFIGS, BenchConfig
from benchmarks.providers import PROVIDERS, Context, Skip, build, make_reference

import rims_fast

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float32
CFGS = [CONFIGS["smoke"], BenchConfig("small", B=16, T=16, D=32, K=6, top_k=4, H=32)]
COMPILE = os.environ.get("RIMS_FAST_BENCH_COMPILE", "0") == "1"

_STATE: dict = {}


def _state(cfg: BenchConfig) -> dict:
    """Reference, input, expected result and built providers of one config (built once)."""
    if cfg.name not in _STATE:
        if DEVICE.type == "cpu":
            torch.set_num_threads(2)
        ref = make_reference(cfg, DEVICE, DTYPE)
        ctx = Context(cfg, DEVICE, DTYPE, ref, allow_compile=COMPILE,
                      compile_skip_reason="torch_compile runs only with RIMS_FAST_BENCH_COMPILE=1 "
                                          "(compiling the unrolled loop takes tens of seconds)")
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(cfg.T, cfg.B, cfg.M, cfg.D, generator=gen).to(DEVICE, DTYPE)
        g = torch.randn(cfg.T, cfg.B, cfg.K * cfg.H, generator=gen).to(DEVICE, DTYPE)
        with torch.no_grad():
            z = x.new_zeros(cfg.B, cfg.K, cfg.H)
            expected = rims_fast.rim_ref(x, z, z, dict(ref.named_parameters(recurse=False)), ref.config)
        _STATE[cfg.name] = {"ctx": ctx, "x": x, "g": g, "expected": expected, "built": {}}
    return _STATE[cfg.name]


def _provider(cfg: BenchConfig, name: str):
    st = _state(cfg)
    if name not in st["built"]:
        try:
            p = build(name, st["ctx"])
        except Skip as e:
            st["built"][name] = ("skip", str(e))
        else:
            if p.is_rim or isinstance(p.module, rims_fast.BRIM):
                ok, detail = (harness.gate(p, st["x"], st["ctx"].reference, st["expected"])
                              if p.is_rim else harness.gate_brim(p, st["x"]))
                print(f"gate {name} on {cfg.name}: {detail}")
                st["built"][name] = ("ok", p) if ok else ("fail", detail)
            else:
                st["built"][name] = ("ok", p)
    kind, val = st["built"][name]
    if kind == "skip":
        pytest.skip(f"{name}: {val}")
    if kind == "fail":
        pytest.fail(f"{name} failed the correctness gate on {cfg.name}: {val}")
    return st, val


@pytest.mark.parametrize("cfg", CFGS, ids=[c.name for c in CFGS])
@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench(benchmark, provider, mode, cfg):
    st, p = _provider(cfg, provider)
    call = harness.Call(p, mode, st["x"], st["g"])

    def setup():
        call.prepare()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    def target():
        call.timed()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{cfg.name} ({cfg.describe()}) {mode}"
    benchmark.extra_info.update(provider=provider, config=cfg.name, mode=mode, device=str(DEVICE),
                                dtype=str(DTYPE), tokens=cfg.B * cfg.T)
    benchmark.pedantic(target, setup=setup, rounds=5, warmup_rounds=1, iterations=1)
