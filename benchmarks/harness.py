"""Correctness gate, timing and peak memory of providers.

Timing: on GPU ``triton.testing.do_bench`` (median) when Triton imports, else CUDA events (median
of repetitions after warm-up); with ``rounds > 1`` every provider is timed that many times, the
providers' order rotated each round, and a row's median is the median of its round medians (its
``min_ms`` the fastest round), so that a drift during the run (clocks, other work on the machine)
does not land on whichever providers came last: two H100 runs of 2026-11-27 disagreed by up to
2.2x on single timings. On CPU the median of *interleaved* repetitions: each round calls every
provider once, in a rotating order, so that noise (frequency changes, other processes) hits all
providers alike.

Modes: ``fwd`` is a forward without autograd recording (``torch.no_grad``); ``bwd`` is the
backward alone of a recorded forward (random ``grad_output`` on ``out``; gradients into ``x`` and
all parameters); ``fwd+bwd`` is both.

Peak memory, measured in a separate call after timing: on GPU ``torch.cuda.max_memory_allocated``
above what was allocated before the call; on CPU the high-water mark of bytes allocated by
PyTorch's CPU allocator during the call, above the start, read from ``torch.profiler``'s memory
events (``profile_memory=True``). Neither counts memory held before the call (parameters, input,
and for ``bwd`` the saved activations of the forward).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch
from torch import Tensor

import rims_fast
from rims_fast.reference import _Rounder, compute_dtype, gru_cell_ref, lstm_cell_ref, null_softmax, select_active

from .providers import Provider

__all__ = ["TOLERANCES", "gate", "Timer", "measure_peak", "mem_method"]

#: dtype -> (atol, rtol) on out, h_n, c_n, and the relative tie threshold of the masks (SPEC: rows
#: where the k_A-th and (k_A+1)-th smallest p differ by at most ``tie * max p`` may differ).
TOLERANCES = {
    torch.float64: (1e-9, 1e-7, 1e-12),
    torch.float32: (2e-4, 2e-3, 1e-6),
    torch.bfloat16: (6e-2, 6e-2, 1e-3),
    torch.float16: (1e-2, 1e-2, 1e-4),
}

MODES = ("fwd", "bwd", "fwd+bwd")


# ---------------------------------------------------------------------------------------------
# Correctness gate
# ---------------------------------------------------------------------------------------------
def _null_probs(x: Tensor, h_prev: Tensor, ref: torch.nn.Module) -> Tensor:
    """SPEC step 2's ``p``, ``(T, B, K)``, from the states the reference carried into each step
    (``h_prev``: ``(T, K, B, H)`` in the compute dtype), with the reference's roundings."""
    cfg = ref.config
    T, B, M, D = x.shape
    K, n, dk = cfg.num_units, cfg.input_heads, cfg.input_key_size
    ct = compute_dtype(x.dtype)
    rnd = _Rounder(x.dtype)
    keys = (x.to(ct) @ ref.input_key.to(ct)).view(T, B, M, n, dk)
    q = torch.einsum("tkbh,khe->tkbe", rnd(h_prev), ref.input_query.to(ct)).view(T, K, B, n, dk)
    s = torch.einsum("tkbnd,tbmnd->tkbnm", rnd(q), rnd(keys)) * (1.0 / math.sqrt(dk))
    return null_softmax(s)[1].mean(-1).permute(0, 2, 1)


def gate(provider: Provider, x: Tensor, ref: torch.nn.Module, expected: tuple) -> tuple[bool, str]:
    """Compare ``provider``'s ``out``, ``h_n``, ``c_n`` and masks with ``expected`` (the result of
    :func:`rims_fast.rim_ref` on the same input and parameters). Masks must agree except in
    near-tie rows (SPEC "Module API"); where they differ, values are compared with the reference
    run under the provider's own masks. Returns ``(passed, detail)``."""
    atol, rtol, tie = TOLERANCES[x.dtype]
    with torch.no_grad():
        got = provider.run(x)
    out, h_n, c_n, masks = got
    e_out, e_h, e_c, e_masks = expected
    notes = []
    if masks.shape != e_masks.shape:
        return False, f"masks have shape {tuple(masks.shape)}, expected {tuple(e_masks.shape)}"
    if not torch.equal(masks, e_masks):
        # Once one near-tie row flips, the two trajectories part and the reference's own later
        # selections say nothing about the provider's. So (SPEC "Module API"): run the reference
        # under the provider's masks, re-run the competition along that trajectory, and require
        # the provider's masks to agree with it except in near-tie rows; values are compared
        # against that run.
        cfg = ref.config
        carried = []  # the state each step starts from, exactly as the reference carries it

        def lstm_cell(gates, h, c, mask):
            carried.append(h)
            return lstm_cell_ref(gates, h, c, mask)

        def gru_cell(gi, gh, h, mask):
            carried.append(h)
            return gru_cell_ref(gi, gh, h, mask)

        with torch.no_grad():
            h0 = x.new_zeros(x.shape[1], cfg.num_units, cfg.hidden_size)
            params = dict(ref.named_parameters(recurse=False))
            c0 = h0.clone() if cfg.cell == "lstm" else None
            e_out, e_h, e_c, _ = rims_fast.rim_ref(x, h0, c0, params, cfg, masks=masks,
                                                   lstm_cell=lstm_cell, gru_cell=gru_cell)
            p = _null_probs(x, torch.stack(carried), ref)  # (T, B, K)
            lower = torch.ones(cfg.num_units, cfg.num_units, dtype=torch.bool, device=x.device).tril(-1)
            implied = select_active(p.permute(2, 0, 1).flatten(1), cfg.top_k, lower)
            implied = implied.view(cfg.num_units, *p.shape[:2]).permute(1, 2, 0)
        diff_rows = (masks != implied).any(-1)  # (T, B)
        ps = p[diff_rows].sort(-1).values
        gap = ps[:, cfg.top_k] - ps[:, cfg.top_k - 1] if cfg.top_k < cfg.num_units else ps[:, 0] * 0
        n_bad = int((gap > tie * ps.amax(-1)).sum())
        notes.append(f"masks differ from the reference's own in "
                     f"{int((masks != e_masks).any(-1).sum())} of {diff_rows.numel()} rows; from the "
                     f"competition along the provider's trajectory in {int(diff_rows.sum())} "
                     f"({n_bad} not near-ties)")
        if n_bad:
            return False, "; ".join(notes)
    ok = True
    for label, a, b in (("out", out, e_out), ("h_n", h_n, e_h), ("c_n", c_n, e_c)):
        if b is None:
            continue
        a, b = a.float() if a.dtype != torch.float64 else a, b.float() if b.dtype != torch.float64 else b
        if a.shape != b.shape:
            return False, f"{label} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        err = (a - b).abs()
        bad = ~(err <= atol + rtol * b.abs())  # NaN counts as bad
        notes.append(f"{label} max abs err {err.max().item():.2e}")
        ok &= not bool(bad.any())
    return ok, "; ".join(notes)


def gate_brim(provider: Provider, x: Tensor) -> tuple[bool, str]:
    """The gate of a BRIM provider (``provider.module`` a :class:`rims_fast.BRIM`): its top-layer
    ``out`` and final state against :func:`rims_fast.brim_ref` on the same parameters, run under
    the provider's own per-layer masks (so the arithmetic is compared even where a near-tie flips
    a selection and the trajectories part). How many mask rows differ from the reference's own
    competition is reported, not judged here: the competition of each backend is tested exactly
    in ``tests/``."""
    atol, rtol, _ = TOLERANCES[x.dtype]
    m = provider.module
    with torch.no_grad():
        out, states, masks = m(x if x.shape[2] > 1 else x.squeeze(2), return_masks=True)
        P = [dict(layer.named_parameters()) for layer in m.layers]
        zero = [(x.new_zeros(x.shape[1], c.num_units, c.hidden_size),) * 2 for c in m.configs]
        zero = [(h, c if cfg.cell == "lstm" else None) for (h, c), cfg in zip(zero, m.configs)]
        e_outs, e_final, _ = rims_fast.brim_ref(x, zero, P, m.configs, masks=masks)
        _, _, own = rims_fast.brim_ref(x, zero, P, m.configs)
    differ = sum(int((a != b).any(-1).sum()) for a, b in zip(masks, own))
    notes = [f"run under its own masks ({differ} rows differ from the reference's competition)"]
    h_n = states[-1][0] if isinstance(states[-1], tuple) else states[-1]
    ok = True
    for label, a, b in (("out", out, e_outs[-1]), ("h_n", h_n, e_final[-1][0])):
        a, b = a.double(), b.double()
        err = (a - b).abs()
        notes.append(f"{label} max abs err {err.max().item():.2e}")
        ok &= not bool((~(err <= atol + rtol * b.abs())).any())
    return ok, "; ".join(notes)


# ---------------------------------------------------------------------------------------------
# One call of a provider in a mode
# ---------------------------------------------------------------------------------------------
class Call:
    """``prepare()`` (untimed) then ``timed()``; ``retained()`` is the repeatable timed part for
    ``do_bench`` (backward with ``retain_graph``)."""

    def __init__(self, provider: Provider, mode: str, x: Tensor, grad_out: Tensor):
        self.p, self.mode, self.x, self.g = provider, mode, x, grad_out
        self.xg = x.detach().clone().requires_grad_(True)
        self.out: Optional[Tensor] = None

    def grads(self) -> list:
        return [self.xg] + list(self.p.params)

    def _zero(self):
        for t in self.grads():
            t.grad = None

    def prepare(self):
        self._zero()
        self.out = None
        if self.mode == "bwd":
            self.out = self.p.run(self.xg)[0]

    def timed(self):
        if self.mode == "fwd":
            with torch.no_grad():
                self.p.run(self.x)
        elif self.mode == "fwd+bwd":
            self.p.run(self.xg)[0].backward(self.g)
        else:
            out, self.out = self.out, None
            out.backward(self.g)

    def repeatable(self) -> Callable:
        """A function do_bench can call repeatedly (gradients are reset by do_bench)."""
        if self.mode == "bwd":
            self.prepare()
            out = self.out
            return lambda: out.backward(self.g, retain_graph=True)
        return self.timed


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times a set of calls; ``run(calls) -> {name: [seconds, ...]}``."""

    def __init__(self, device: torch.device, reps: int, warmup: int = 1, rounds: int = 1):
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.device, self.reps, self.warmup, self.rounds = device, reps, warmup, rounds
        self.method = "cpu: median of interleaved repetitions (time.perf_counter)"
        self._do_bench = None
        if device.type == "cuda":
            try:
                from triton.testing import do_bench
                self._do_bench = do_bench
                self.method = "gpu: triton.testing.do_bench, median"
            except Exception:  # noqa: BLE001 - fall back to CUDA events
                self.method = "gpu: CUDA events, median of repetitions"
            if rounds > 1:
                self.method += (f"; median of {rounds} rounds, each timing every provider in a "
                                "rotated order (min ms: the fastest round)")

    def run(self, calls: dict[str, Call], on_first: Optional[Callable[[str, float], None]] = None
            ) -> tuple[dict[str, list[float]], dict[str, str]]:
        """``(times, errors)``: seconds per timed repetition, and the error of each provider
        that raised (it is dropped from the remaining rounds)."""
        errors: dict[str, str] = {}
        if self.device.type == "cuda":
            return self._gpu_rounds(calls, on_first, errors), errors
        return self._cpu_interleaved(calls, on_first, errors), errors

    def _gpu_rounds(self, calls, on_first, errors) -> dict[str, list[float]]:
        """One list per provider: with one round, its repetitions' times (do_bench: one median);
        with several, one median per round. on_first sees round 0's first calls only."""
        names = list(calls)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(self.rounds):
            live = [n for n in names if n not in errors]
            k = r % len(live) if live else 0
            for name in live[k:] + live[:k]:
                first = on_first if r == 0 else None
                try:
                    ts = self._gpu(calls[name], first and (lambda s, n=name: first(n, s)))
                except Exception as e:  # noqa: BLE001 - reported as FAILED
                    errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    calls[name].out = None
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                if self.rounds == 1:
                    times[name].extend(ts)
                else:
                    times[name].append(median(ts))
        return {n: t for n, t in times.items() if n not in errors}

    def _cpu_interleaved(self, calls, on_first, errors) -> dict[str, list[float]]:
        names = list(calls)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(self.warmup + self.reps):
            live = [n for n in names if n not in errors]
            if not live:
                break
            k = r % len(live)
            for name in live[k:] + live[:k]:  # rotate the order every round
                c = calls[name]
                try:
                    c.prepare()
                    t0 = time.perf_counter()
                    c.timed()
                    dt = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - reported as FAILED
                    errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    c.out = None
                    continue
                if r == 0 and on_first:
                    on_first(name, dt)
                if r >= self.warmup:
                    times[name].append(dt)
        return {n: t for n, t in times.items() if n not in errors}

    def _gpu(self, call: Call, on_first) -> list[float]:
        _sync(self.device)
        call.prepare()
        t0 = time.perf_counter()
        call.timed()  # first call: compile / autotune / cuDNN plans, reported apart
        _sync(self.device)
        if on_first:
            on_first(time.perf_counter() - t0)
        fn = call.repeatable()
        if self._do_bench is not None:
            ms = self._do_bench(fn, grad_to_none=call.grads(), return_mode="median")
            return [ms / 1e3]
        for _ in range(self.warmup):
            fn()
        out = []
        for _ in range(max(self.reps, 3)):
            for t in call.grads():
                t.grad = None
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        return out


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------
def mem_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the start of the call"
    return ("CPU: high-water of PyTorch CPU-allocator bytes above the start of the call, "
            "from torch.profiler memory events")


def measure_peak(call: Call, device: torch.device) -> Optional[int]:
    """Peak bytes allocated during one ``timed()`` call above what was allocated before it."""
    try:
        return _measure_peak(call, device)
    except Exception:  # noqa: BLE001 - reported as n/a
        call.out = None
        return None


def _measure_peak(call: Call, device: torch.device) -> Optional[int]:
    call.prepare()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call.timed()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr():  # kineto prints start/stop lines to fd 2
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call.timed()
    events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"
                 and str(e.device_type()).endswith("CPU"))
    cum = peak = 0
    for _, n in mem:
        cum += n
        peak = max(peak, cum)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def median(xs: list[float]) -> float:
    return statistics.median(xs)
