"""Per-step work of a RIM layer and of nn.LSTM, the floors it implies, and launch counts.

``python -m benchmarks.flops``                 FLOPs / weight bytes / floors (Markdown) for paper, large
``python -m benchmarks.flops --launches``      + ops per step of the eager reference, counted with
                                               torch.profiler (CPU leaf ops; CUDA kernel launches
                                               with ``--device cuda``)
``python -m benchmarks.flops --matmul``        + this CPU's torch.mm / bmm GFLOP/s
``python -m benchmarks.flops --triton``        + the Triton forward's L2 traffic per step, fused
                                               and column-tiled (a model, not a measurement)
``python -m benchmarks.flops --seq-trips``     + the persistent CUDA-core forward's dependent L2
                                               round trips per thread and step, per code version
                                               (a latency model, calibrated on one measurement)
``python -m benchmarks.flops --steps``         + the stepped forward's GEMM FLOPs, bytes and
                                               launches per step, and the floors they imply

FLOPs count a multiply-add as 2. "all" is what the reference evaluates (every mechanism, masked
afterwards); "active-only" is what a kernel that skips inactive mechanisms must do (SPEC step 3
allows it). Queries, scores and the communication keys/values are needed for all mechanisms either
way (the competition ranks all K; inactive mechanisms still offer keys and values).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from .configs import CONFIGS, BenchConfig

H100_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak (SXM)
H100_HBM_BPS = 3.35e12
LAUNCH_US = (2.0, 4.0)  # per kernel launch on the sequential critical path


def rim_terms(c: BenchConfig, n_in: int = 1, d_k: int = 64, d_v: int | None = None,
              n_c: int = 4, d_c: int = 32, d_cv: int = 32) -> dict:
    """FLOPs per sample per step by term: ``{term: (all, active_only, where)}``; LSTM cell."""
    K, kA, H, D, M = c.K, c.top_k, c.H, c.D, c.M
    d_v = d_v or 4 * H // n_in
    nk, nv, ck, cv, GH = n_in * d_k, n_in * d_v, n_c * d_c, n_c * d_cv, 4 * H
    folded = M * D <= d_v
    t = {
        "input keys x·W_k (hoisted before the loop)": (2 * M * D * nk,) * 2 + ("hoisted",),
        "input query h·W_q": (K * 2 * H * nk,) * 2 + ("step",),
        "scores + null softmax + p": (K * (2 * M * nk + 6 * n_in * (M + 1)),) * 2 + ("step",),
    }
    if folded:
        t["input term, folded: x·(W_v W_ih) (hoisted)"] = (K * n_in * M * 2 * D * GH, kA * n_in * M * 2 * D * GH, "hoisted")
        t["input term, folded: a·(x W_v W_ih)"] = (K * n_in * M * 2 * GH, kA * n_in * M * 2 * GH, "step")
    else:
        t["input values x·W_v (hoisted)"] = (2 * M * D * nv,) * 2 + ("hoisted",)
        t["input read u = a·V"] = (K * 2 * M * nv, kA * 2 * M * nv, "step")
        t["input term u·W_ih"] = (K * 2 * nv * GH, kA * 2 * nv * GH, "step")
    t["recurrent gates h·W_hh"] = (K * 2 * H * GH, kA * 2 * H * GH, "step")
    t["pointwise (biases, 4H activations, c/h update) ~"] = (K * 16 * H, kA * 16 * H, "step")
    t["comm Q"] = (K * 2 * H * ck, kA * 2 * H * ck, "step")
    t["comm K, V (all mechanisms offer)"] = (K * 2 * H * (ck + cv),) * 2 + ("step",)
    t["comm attention (scores + read)"] = (K * 2 * K * (ck + cv), kA * 2 * K * (ck + cv), "step")
    t["comm output o·W_o (+ residual)"] = (K * (2 * cv * H + H), kA * (2 * cv * H + H), "step")
    t["_folded"] = folded
    t["_fold_once"] = 2 * K * n_in * D * d_v * GH if folded else 0
    return t


def rim_weight_bytes(c: BenchConfig, folded: bool, itemsize: int, n_in: int = 1, d_k: int = 64,
                     n_c: int = 4, d_c: int = 32, d_cv: int = 32) -> tuple[int, int]:
    """(bytes of weights read each step, bytes of the hoisted input term read each step per sample).
    Each step needs every mechanism's weights (different samples pick different mechanisms)."""
    K, H = c.K, c.H
    d_v = 4 * H // n_in
    nk, nv, ck, cv, GH = n_in * d_k, n_in * d_v, n_c * d_c, n_c * d_cv, 4 * H
    w = K * H * nk + K * H * GH + 2 * K * GH + K * H * (2 * ck + cv) + K * cv * H
    if not folded:
        w += K * nv * GH
    act = K * n_in * c.M * GH if folded else c.M * nv  # per sample: x·W precomputed, read per step
    return w * itemsize, act * itemsize


def lstm_terms(D: int, Hl: int) -> dict:
    return {
        "input term x·W_ih (cuDNN hoists it)": (2 * D * 4 * Hl, "hoisted"),
        "recurrent gates h·W_hh": (2 * Hl * 4 * Hl, "step"),
        "pointwise ~": (16 * Hl, "step"),
        "_weights": (D * 4 * Hl + Hl * 4 * Hl + 8 * Hl),
    }


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _us(s: float) -> str:
    return f"{s * 1e6:.3g} µs"


def step_flops(c: BenchConfig, provider: str) -> float | None:
    """Useful FLOPs per step of a whole batch on the sequential path (not the hoisted products):
    a RIM layer's active-only step terms (:func:`rim_terms`), or ``nn.LSTM``'s recurrent gates
    and pointwise work; None for providers computing something else (BRIM stacks). Divided by a
    measured time per step it is the sequential part's achieved FLOP rate, and by the device's
    peak its utilisation (the benchmark report's ``step TFLOP/s`` column)."""
    if provider.startswith("brim"):
        return None
    if provider == "lstm":
        t = lstm_terms(c.M * c.D, c.K * c.H)
        return c.B * sum(v[0] for k, v in t.items() if not k.startswith("_") and v[1] == "step")
    t = rim_terms(c)
    return c.B * sum(v[1] for k, v in t.items() if not k.startswith("_") and v[2] == "step")


def report_rim(c: BenchConfig, cpu_gflops: float | None) -> str:
    t = rim_terms(c)
    folded, fold_once = t.pop("_folded"), t.pop("_fold_once")
    lines = [f"#### `{c.name}`: {c.describe()} (input term {'folded' if folded else 'unfolded'}: "
             f"M·D = {c.M * c.D} {'≤' if folded else '>'} d_v = {4 * c.H})", "",
             "| term | where | FLOPs/sample, all K | FLOPs/sample, active-only | per batch (B={}), all | per batch, active-only |".format(c.B),
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    tot = {"all": 0, "act": 0, "step_all": 0, "step_act": 0}
    for name, (a, k, where) in t.items():
        lines.append(f"| {name} | {where} | {_fmt(a)} | {_fmt(k)} | {_fmt(a * c.B)} | {_fmt(k * c.B)} |")
        tot["all"] += a
        tot["act"] += k
        if where == "step":
            tot["step_all"] += a
            tot["step_act"] += k
    lines.append(f"| **total per step** | | **{_fmt(tot['all'])}** | **{_fmt(tot['act'])}** | "
                 f"**{_fmt(tot['all'] * c.B)}** | **{_fmt(tot['act'] * c.B)}** |")
    lines.append(f"| of which on the sequential path (not hoisted) | | {_fmt(tot['step_all'])} | "
                 f"{_fmt(tot['step_act'])} | {_fmt(tot['step_all'] * c.B)} | {_fmt(tot['step_act'] * c.B)} |")
    if fold_once:
        lines.append(f"\nFold W_v·W_ih once per call: {_fmt(fold_once)} FLOPs.")
    w32, act32 = rim_weight_bytes(c, folded, 4)
    w16, act16 = rim_weight_bytes(c, folded, 2)
    flops_b = tot["act"] * c.B
    comp = flops_b / H100_BF16_FLOPS
    mem = (w16 + act16 * c.B) / H100_HBM_BPS
    lines += ["",
              f"Weights read per step: {w32 / 2**20:.2f} MiB fp32 / {w16 / 2**20:.2f} MiB bf16 "
              f"(every mechanism's: different samples pick different mechanisms); the hoisted input "
              f"term read per step: {act16 * c.B / 2**20:.2f} MiB bf16 per batch.",
              "",
              f"H100 floor per step (bf16, active-only): compute {_us(comp)} "
              f"({_fmt(flops_b)} FLOP at 989 TFLOP/s), HBM {_us(mem)} (weights + hoisted input term at "
              f"3.35 TB/s; the weights fit in the 50 MB L2, so this is an upper bound on the memory floor); "
              f"per sequence of T={c.T}: {_us(max(comp, mem) * c.T)}, i.e. "
              f"{c.B * c.T / (max(comp, mem) * c.T) / 1e6:.3g}M tokens/s. Neither bound is what limits "
              f"a real kernel at these sizes: each step is a chain of about ten dependent stages "
              f"(query, scores, softmax, rank, gates, cell, comm Q/K/V, comm softmax, output) on "
              f"tensors far smaller than the GPU, so even one persistent kernel pays a few µs of "
              f"latency per step; the eager reference pays one launch per op (below)."]
    if cpu_gflops:
        lines.append(f"\nThis CPU's floor per step (fp32, at {cpu_gflops:.0f} GFLOP/s measured): all K "
                     f"{_us(tot['all'] * c.B / (cpu_gflops * 1e9))}, active-only "
                     f"{_us(flops_b / (cpu_gflops * 1e9))}; per sequence of T={c.T}: "
                     f"{tot['all'] * c.B * c.T / (cpu_gflops * 1e9) * 1e3:.3g} ms (all K).")
    return "\n".join(lines)


def report_lstm(D: int, Hl: int, B: int, T: int, cpu_gflops: float | None) -> str:
    t = lstm_terms(D, Hl)
    w = t.pop("_weights")
    lines = [f"#### `nn.LSTM({D}, {Hl})`, B={B}, T={T}", "",
             "| term | where | FLOPs/sample | per batch |", "| --- | --- | ---: | ---: |"]
    tot = 0
    for name, (a, where) in t.items():
        lines.append(f"| {name} | {where} | {_fmt(a)} | {_fmt(a * B)} |")
        tot += a
    lines.append(f"| **total per step** | | **{_fmt(tot)}** | **{_fmt(tot * B)}** |")
    comp = tot * B / H100_BF16_FLOPS
    mem = w * 2 / H100_HBM_BPS
    lines += ["", f"Weights: {w * 4 / 2**20:.2f} MiB fp32 / {w * 2 / 2**20:.2f} MiB bf16, read every step. "
              f"H100 floor per step (bf16): compute {_us(comp)}, HBM {_us(mem)}; per sequence "
              f"{_us(max(comp, mem) * T)}. cuDNN runs the time loop inside the library: a few kernels per "
              "step (2 forward, 5 forward+backward, counted on an H100 in fp32), none from Python."]
    if cpu_gflops:
        lines.append(f"\nThis CPU's floor per step (fp32, {cpu_gflops:.0f} GFLOP/s): {_us(tot * B / (cpu_gflops * 1e9))}; "
                     f"per sequence {tot * B * T / (cpu_gflops * 1e9) * 1e3:.3g} ms.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def matmul_gflops(threads: int = 2) -> dict[str, float]:
    """GFLOP/s of torch.mm / torch.bmm on this CPU, fp32, best of 10 after warm-up (a floor
    wants the machine's capability, not its noise)."""
    torch.set_num_threads(threads)
    cases = {"mm 1024x1024x1024": ((1024, 1024), (1024, 1024), torch.mm),
             "bmm paper W_hh (6x[64x100 @ 100x400])": ((6, 64, 100), (6, 100, 400), torch.bmm),
             "mm nn.LSTM(64, 600) W_hh ([64x600 @ 600x2400])": ((64, 600), (600, 2400), torch.mm)}
    out = {}
    for name, (sa, sb, op) in cases.items():
        a, b = torch.randn(*sa), torch.randn(*sb)
        flops = 2 * a.numel() * sb[-1]
        for _ in range(3):
            op(a, b)
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            reps = max(1, int(2e8 // flops))
            for _ in range(reps):
                op(a, b)
            ts.append((time.perf_counter() - t0) / reps)
        out[name] = flops / min(ts) / 1e9
    return out


_VIEWS = {"aten::view", "aten::reshape", "aten::unsqueeze", "aten::squeeze", "aten::transpose",
          "aten::permute", "aten::expand", "aten::as_strided", "aten::select", "aten::slice",
          "aten::unbind", "aten::chunk", "aten::split", "aten::narrow", "aten::t", "aten::detach",
          "aten::alias", "aten::lift_fresh", "aten::empty", "aten::empty_strided", "aten::resize_",
          "aten::_unsafe_view", "aten::view_as", "aten::flatten", "aten::contiguous",
          "aten::result_type", "aten::empty_like", "aten::detach_", "aten::_reshape_alias",
          "aten::expand_as", "aten::squeeze_", "aten::unsqueeze_", "aten::set_", "aten::zeros_like",
          "aten::ones_like", "aten::unflatten", "aten::numpy_T", "aten::is_nonzero", "aten::size",
          "aten::stride", "aten::dim", "aten::is_same_size", "detach", "aten::_has_compatible_shallow_copy_type"}
_LAUNCH = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
           "cudaMemcpyAsync", "cudaMemsetAsync"}


def _count(fn, device: torch.device) -> tuple[int, int]:
    """(leaf compute ops, CUDA launches incl. memcpy/memset) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    from .harness import _quiet_stderr
    with warnings.catch_warnings(), _quiet_stderr(), profile(activities=acts) as prof:
        warnings.simplefilter("ignore")
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    leaf = launches = 0
    for e in prof.events():
        if e.name in _LAUNCH:
            launches += 1
        elif (e.name.startswith("aten::") and e.name not in _VIEWS
              and not any(ch.name.startswith("aten::") for ch in e.cpu_children)):
            leaf += 1
    return leaf, launches


def launches_per_step(cfg: BenchConfig, device: torch.device) -> dict[str, tuple[int, int]]:
    """Per-step (leaf ops, CUDA launches) of the eager reference and of NaiveRIM, fwd (no_grad)
    and fwd+bwd: the count at T=3 minus the count at T=2."""
    from dataclasses import replace

    from .naive import NaiveRIM
    from .providers import make_reference

    res = {}
    for label in ("torch", "naive", "lstm"):
        for mode in ("fwd", "fwd+bwd"):
            counts = []
            for T in (2, 3):
                c = replace(cfg, T=T)
                ref = make_reference(c, device, torch.float32)
                m = {"torch": ref, "naive": NaiveRIM(ref),
                     "lstm": torch.nn.LSTM(c.D, c.K * c.H, device=device)}[label]
                x = torch.randn(T, c.B, c.D, device=device)

                def run():
                    if mode == "fwd":
                        with torch.no_grad():
                            m(x)
                    else:
                        m(x.requires_grad_())[0].sum().backward()
                run()  # warm-up (cuDNN plans, lazy init)
                counts.append(_count(run, device))
            res[f"{label} {mode}"] = (counts[1][0] - counts[0][0], counts[1][1] - counts[0][1])
    return res


def triton_l2_bytes(c: BenchConfig, tiled: bool, block_b: int, block_u: int = 32,
                    n_in: int = 1, d_k: int = 64, n_c: int = 4, d_c: int = 32, d_cv: int = 32,
                    w_bytes: int = 2) -> dict[str, float]:
    """Bytes one step of the Triton forward reads per kernel (weights in ``w_bytes``, activations
    float32), counting every program's loads as L2 traffic: a weight is read once per program that
    uses it, an activation row once per program that loads it. The fused cell kernel's program
    ``(batch tile, k)`` computes the queries of all K mechanisms (the competition); the tiled
    kernels' programs are ``(batch tile, k)`` (queries, Q|K|V) and ``(batch tile, k, unit tile)``
    (gates). The communication kernel (both modes, 16 samples per program) reads every
    mechanism's K|V of its samples."""
    B, K, H, M = c.B, c.K, c.H, c.M
    GH, nk, cq, cv = 4 * H, n_in * d_k, n_c * d_c, n_c * d_cv
    nb = -(-B // block_b)
    w_q, w_hh, w_c, w_o = H * nk * w_bytes, H * GH * w_bytes, H * (2 * cq + cv) * w_bytes, cv * H * w_bytes
    xw = 4 * B * K * n_in * M * GH  # the hoisted folded input term of the step
    rows = 4 * B * K * H  # one float32 (B, K, H) array
    keys = 4 * block_b * M * nk  # a program's keys
    if tiled:
        nu = -(-H // block_u)
        t = {"query": nb * K * (w_q + keys) + rows,
             "gates": nb * K * w_hh + xw + nu * rows,
             "qkv": nb * K * w_c + rows}
    else:
        t = {"cell": nb * K * K * (w_q + keys) + K * rows + nb * K * (w_hh + w_c) + xw + rows}
    nbc = -(-B // 16)
    t["comm"] = nbc * K * w_o + K * 4 * B * K * (cq + cv) + rows
    return t


def seq_fwd_trips(c: BenchConfig, S: int = 1, columns: int = 4, batch: int = 16,
                  query_items_per_sample: bool = False, query_batch: int = 16,
                  threads: int = 256, n_in: int = 1, d_k: int = 64, n_c: int = 4, d_c: int = 32,
                  d_cv: int = 32, hoisted: bool = False) -> dict[str, int]:
    """Dependent L2 round trips one thread of the persistent CUDA-core forward
    (``csrc/kernels/rim_seq_fwd.cuh``, one block of ``threads`` per tile of ``S`` samples) waits
    on per step, by weight product: the items (a mechanism's ``columns`` adjacent columns, all
    the tile's samples) are spread over the threads (``rounds``), and an item's reduction of
    length ``n`` loads its weights ``batch`` rows at a time before their FMAs (``ceil(n /
    batch)`` trips). ``query_items_per_sample``: the input queries as they were before
    weight-stationary items (one item per sample, mechanism and column, loop unrolled by
    ``query_batch``). ``hoisted``: the input term hoisted out of the recurrence
    (``RIMS_FAST_CUDA_XW``): a gate item loads, per sample, its ``n_in * M`` rows of ``x F`` one
    after another instead of ``XW`` rows of ``F`` in batches. A model of latency only: no
    bandwidth, FLOPs, barriers or shared memory."""
    K, H, M, D = c.K, c.H, c.M, c.D
    GH, nk, ck, cv = 4 * H, n_in * d_k, n_c * d_c, n_c * d_cv
    d_v = 4 * H // n_in
    XW = n_in * D if M * D <= d_v else n_in * d_v

    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    def rounds(items: int) -> int:
        return cdiv(items, threads)

    def groups(width: int) -> int:
        return cdiv(width, columns)

    q = (rounds(S * K * nk) * cdiv(H, query_batch) if query_items_per_sample
         else rounds(K * groups(nk)) * cdiv(H, batch))
    return {"queries": q,
            "gates": rounds(K * groups(GH)) * ((S * n_in * M if hoisted else cdiv(XW, batch))
                                               + cdiv(H, batch)),
            "Q|K|V": rounds(K * (2 * groups(ck) + groups(cv))) * cdiv(H, batch),
            "output": rounds(K * groups(H)) * cdiv(cv, batch)}


#: The persistent forward's code versions for :func:`seq_fwd_trips`: (label, keyword arguments).
#: 8646de0 is the code the H100 measured (nvcc unrolled the plain column loops by 2 and the query
#: loop by 16, in the sm_90a SASS).
SEQ_VERSIONS = (
    ("8646de0 (measured: plain loops)", dict(columns=1, batch=2, query_items_per_sample=True)),
    ("0816b89 (column_dot, 8 rows)", dict(columns=1, batch=8, query_items_per_sample=True)),
    ("columns_dot (4 columns, 16 rows)", dict(columns=4, batch=16)),
    ("input term hoisted (RIMS_FAST_CUDA_XW)", dict(columns=4, batch=16, hoisted=True)),
    ("512 threads at tile 1 (RIMS_FAST_CUDA_WIDE)", dict(columns=4, batch=16, hoisted=True,
                                                         threads=512)),
)


def report_seq_trips(measured_us: float = 405.0, name: str = "paper") -> str:
    """Markdown table of :func:`seq_fwd_trips` per code version at tile 1, each scaled by the time
    per trip that makes the first version match ``measured_us`` per step (the H100's bf16 tile-1
    forward, results/nvidia-h100-session-2026-11-26d-2-tiles.log)."""
    c = CONFIGS[name]
    rows = [(label, seq_fwd_trips(c, S=1, **kw)) for label, kw in SEQ_VERSIONS]
    ns = measured_us * 1e3 / sum(rows[0][1].values())
    out = [f"`{name}`, tile 1, 256 threads unless the row says otherwise; {ns:.0f} ns per trip "
           "(calibrated on the first row)\n",
           "| code | queries | gates | comm Q/K/V | output | trips per step | model µs per step |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, t in rows:
        tot = sum(t.values())
        out.append(f"| {label} | {t['queries']} | {t['gates']} | {t['Q|K|V']} | {t['output']} | "
                   f"{tot} | {tot * ns / 1e3:.0f} |")
    return "\n".join(out)


def steps_model(c: BenchConfig, n_in: int = 1, d_k: int = 64, n_c: int = 4, d_c: int = 32,
                d_cv: int = 32, w_bytes: int = 2, lstm: bool = True,
                backward: bool = False) -> dict:
    """One step of the stepped forward (``rims_fast::rim_steps_fwd``, csrc/rim_steps_fwd.h): its
    four batched GEMMs over all ``B`` samples and all ``K`` mechanisms (dense: inactive rows are
    computed and discarded), the bytes they and the four phase kernels move (weights in
    ``w_bytes`` read once per step, GEMM operands in ``w_bytes``, results and state float32, each
    written once and read once), and its launches. GRU: two gate GEMMs (one more launch).
    ``backward``: a step of ``rim_steps_bwd`` instead (the four transposed products d o, dh~,
    d xa, dh_{t-1}; its bytes counted like the forward's, which they mirror; 8 launches), and
    ``wgrad_flops``, the weight-gradient GEMMs over all T*B rows after the sweep."""
    B, K, H, M, D = c.B, c.K, c.H, c.M, c.D
    G = 4 if lstm else 3
    GH, nk, ck, cv = G * H, n_in * d_k, n_c * d_c, n_c * d_cv
    d_v = 4 * H // n_in
    XW = n_in * D if M * D <= d_v else n_in * d_v
    C3 = 2 * ck + cv
    flops = {"query": 2 * K * B * H * nk, "gates": 2 * K * B * (H + XW) * GH,
             "Q|K|V": 2 * K * B * H * C3, "output": 2 * K * B * cv * H}
    if backward:  # d o, dh~ through Q|K|V, d xa through F, dh_{t-1} through [W_hh ; W_q]
        flops = {"d o": flops["output"], "dh~": flops["Q|K|V"], "d xa": 2 * K * B * GH * XW,
                 "dh_{t-1}": 2 * K * B * (GH + nk) * H}
    weights = K * (H * nk + (H + XW) * GH + H * C3 + cv * H) * w_bytes
    operands = K * B * (H + XW + H + cv) * w_bytes          # [h | xa], h~, o: written, read
    results = K * B * (nk + GH + C3 + H) * 4                # q, gates, Q|K|V, y: written, read
    state = B * K * H * 4 * (5 if lstm else 3)              # h, c, h~ and out rows, roughly
    inputs = B * M * (nk + (D if M * D <= d_v else n_in * d_v)) * 4  # keys and x of the step
    return {"flops": flops, "weight_bytes": weights,
            "other_bytes": 2 * (operands + results) + state + inputs,
            "launches": 8 if (lstm or backward) else 9,
            "wgrad_flops": 2 * c.T * B * K * (H * nk + H * GH + XW * GH + H * C3 + cv * H)}


def report_steps(names=("paper", "large"), tc_flops: float = H100_BF16_FLOPS,
                 l2_bps: float = 5.5e12) -> str:
    """Markdown table of :func:`steps_model` (bf16): compute at the tensor-core peak and at half of
    it, bytes at L2 bandwidth, and the launch chain at ``LAUNCH_US`` per launch."""
    out = ["| config | GEMM FLOP per step (fwd: query, gates, Q\\|K\\|V, output; bwd: d o, dh~, d xa, "
           "dh_{t-1}) | weights + other bytes "
           "per step | compute at peak / at 50% | bytes at 5.5 TB/s | launches | launch chain | "
           "floor per step | per sequence |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, bwd in ((n, b) for n in names for b in (False, True)):
        c = CONFIGS[name]
        m = steps_model(c, backward=bwd)
        f = sum(m["flops"].values())
        by = m["weight_bytes"] + m["other_bytes"]
        lo, hi = (m["launches"] * u * 1e-6 for u in LAUNCH_US)
        t_c, t_b = f / tc_flops, by / l2_bps
        floor = (max(t_c, t_b) + lo, max(2 * t_c, t_b) + hi)
        per = ", ".join(_fmt(v) for v in m["flops"].values())
        out.append(f"| `{name}` {'bwd' if bwd else 'fwd'} | {_fmt(f)} ({per}) | {m['weight_bytes'] / 1e6:.1f} + "
                   f"{m['other_bytes'] / 1e6:.1f} MB | {_us(t_c)} / {_us(2 * t_c)} | {_us(t_b)} | "
                   f"{m['launches']} | {_us(lo)}–{_us(hi)} | {_us(floor[0])}–{_us(floor[1])} | "
                   f"{floor[0] * c.T * 1e3:.2g}–{floor[1] * c.T * 1e3:.2g} ms |")
    wg = ", ".join(f"`{n}` {_fmt(steps_model(CONFIGS[n], backward=True)['wgrad_flops'])}"
                   for n in names)
    return "\n".join(out) + f"\n\nWeight-gradient GEMMs after the sweep (FLOP per sequence): {wg}."


def report_triton(names=("paper", "large")) -> str:
    """Markdown table of :func:`triton_l2_bytes` for both modes, at the kernels' tile sizes."""
    try:
        from rims_fast.triton_kernels.rim_step_fwd_tiled import tile_sizes
    except ImportError:  # no triton here: the same rule, restated
        def tile_sizes(B, H):
            return (64 if B >= 256 else 16), (16 if H <= 32 else 32)
    else:
        tile_sizes = (lambda f: lambda B, H: tuple(f(B, H))[:2])(tile_sizes)
    out = ["| config | forward | batch tile | L2 MB per step (per kernel) | total | at 5.5 TB/s |",
           "| --- | --- | ---: | --- | ---: | ---: |"]
    for name in names:
        c = CONFIGS[name]
        for tiled in (False, True):
            bb, bu = tile_sizes(c.B, c.H) if tiled else (16, 0)
            t = triton_l2_bytes(c, tiled, bb, bu or 32)
            tot = sum(t.values())
            per = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in t.items())
            out.append(f"| `{name}` | {'tiled' if tiled else 'fused'} | {bb} | {per} | "
                       f"{tot / 1e6:.1f} MB | {tot / 5.5e12 * 1e6:.1f} µs |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--launches", action="store_true", help="count ops/launches per step with torch.profiler")
    ap.add_argument("--matmul", action="store_true", help="measure this CPU's matmul GFLOP/s")
    ap.add_argument("--triton", action="store_true",
                    help="the Triton forward's L2 bytes per step, fused and tiled (a model)")
    ap.add_argument("--seq-trips", action="store_true",
                    help="the persistent CUDA-core forward's L2 round trips per step (a model)")
    ap.add_argument("--steps", action="store_true",
                    help="the stepped forward's FLOPs, bytes and launches per step (a model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gf = None
    if args.matmul:
        m = matmul_gflops(args.threads)
        print(f"### This CPU's fp32 matmul throughput ({args.threads} threads, torch {torch.__version__})\n")
        for k, v in m.items():
            print(f"- {k}: {v:.0f} GFLOP/s")
        print()
        gf = m["mm 1024x1024x1024"]
    for name in ("paper", "large"):
        print(report_rim(CONFIGS[name], gf))
        print()
    print(report_lstm(64, 600, 64, 100, gf))
    print()
    print(report_lstm(512, 2048, 256, 512, gf))
    if args.triton:
        print("\n### The Triton forward's L2 traffic per step (bf16 weights; a model)\n")
        print(report_triton())
    if args.seq_trips:
        print("\n### The persistent CUDA-core forward's dependent L2 round trips per step (a model)\n")
        print(report_seq_trips())
    if args.steps:
        print("\n### The stepped forward per step (bf16 operands; a model)\n")
        print(report_steps())
    if args.launches:
        device = torch.device(args.device)
        print(f"\n### Ops per step ({device.type}, paper shapes, T=3 minus T=2, torch.profiler)\n")
        print("| provider, mode | leaf aten ops (no views) | CUDA launches (kernels + memcpy/memset) |")
        print("| --- | ---: | ---: |")
        for k, (leaf, launches) in launches_per_step(CONFIGS["paper"], device).items():
            print(f"| {k} | {leaf} | {launches if device.type == 'cuda' else 'n/a (CPU)'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
