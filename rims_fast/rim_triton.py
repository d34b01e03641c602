"""``backend="triton"``: one RIM layer over a sequence with Triton kernels (SPEC.md).

What runs where:

- **Forward — Triton kernels** (``triton_kernels/rim_step_fwd.py``), two launches per step, no
  host sync inside the time loop, workspaces allocated once per call:
  ``_rim_cell_fwd_kernel`` (input attention, ``p``, the rank-rule competition, the gate products,
  the masked LSTM/GRU update, and the communication ``Q/K/V`` projections of the new ``h~``) and
  ``_rim_comm_fwd_kernel`` (multi-head communication softmax, read, output projection, residual
  for active / copy for inactive; writes ``out[t]`` and the float32 carried state).
  State-independent work is hoisted out of the loop as PyTorch GEMMs before it: the input keys of
  all steps and the folded input term ``XW[t,b,k,n,m] = X_m (input_value_n W_ih[k]_n)`` (the read
  is linear in the attention probabilities, as in ``reference._InputGates``).
  With ``RIMS_FAST_TRITON_FWD=tiled`` (:func:`fwd_mode`; opt-in: on an H100 it was faster than
  the fused forward only under graph replay, README's environment table) the cell
  kernel's work is three kernels of ``triton_kernels/rim_step_fwd_tiled.py`` instead — each
  mechanism's queries once, the gate products and cell on a grid of batch tile x mechanism x unit
  tile, the communication Q|K|V — for wide layers, where a program owning all of a mechanism's
  gate columns has too large a tile (four launches per step; the same values and saved tensors).
- **Backward — two implementations**, chosen by the environment variable
  ``RIMS_FAST_TRITON_BWD`` (read at each forward call):

  ``recompute`` (the default, on every device): :class:`RimFn`'s backward re-runs
  :func:`rims_fast.reference.rim_ref` under autograd with ``masks=`` the forward's masks (so the
  selection is identical) and differentiates it. With dropout in training mode, the forward's
  dropout keep-masks are regenerated from the same counter-based Triton stream
  (``_rim_dropout_masks_fwd_kernel``: same seed, same ``(t, b, k, n, m|j)`` offsets) and the
  recompute hands them to ``rim_ref(dropout_masks=...)``. The forward saves nothing extra.

  ``kernels``: a reverse-time sweep of Triton kernels (``triton_kernels/rim_step_bwd.py``, two
  launches per step: ``_rim_comm_bwd_kernel`` — ``dh'`` -> ``d o``, communication softmax
  backward, ``dQ``; ``_rim_cell_bwd_kernel`` — ``dK``/``dV`` of every mechanism as a loop over the
  querying mechanisms (deterministic, no atomics), ``dh~``, masked LSTM/GRU backward, input
  attention (null softmax) backward, ``dh_{t-1}``/``dc_{t-1}``), then the weight gradients as
  PyTorch GEMMs over all ``T*B`` rows, including the hoisted parts (``keys = x input_key`` ->
  ``d input_key``, ``dx``; the folded ``XW`` -> ``d input_value``, ``d weight_ih``, ``dx``). It is
  the separate op ``rims_fast::rim_triton_bwd`` (fake impl: compile traces it as one node).
  *Saved* by the forward, only when this mode is on and a gradient is required (the op's
  ``save`` flag; the kernels write straight into ``(T, ...)`` float32 buffers, :data:`SAVED`):
  the ``h`` and ``c`` histories (float32 carried state, ``T+1`` slots), ``h~``, the
  communication ``Q/K/V`` (rounded as used), the gate pre-activations (LSTM ``i|f|g|o`` sums;
  GRU ``gi|gh``, because ``r`` multiplies ``gh_n`` alone), the undropped input and communication
  probabilities, the (dropped, rounded) communication read ``o`` (for ``d comm_output``), and the
  hoisted keys. *Recomputed* in the backward: the gate activations (a few pointwise ops from the
  pre-activations), the dropout keep-masks (from the same counter-based stream, in registers —
  never stored), the input queries (one GEMM over all rows, for ``d input_key``), the fold
  ``input_value_n weight_ih[k]_n`` (small) and the folded input term ``XW`` chunk by chunk in
  reverse (one GEMM per chunk, the forward's chunks: bit-identical; saving it would be
  ``B·K·n_in·M·G·H`` floats per step, 4.3 GB at ``large``). The saved histories cost memory
  linear in ``T``; the sweep recomputes nothing else of the forward.

  Why ``recompute`` stays the default: the ``kernels`` path is tested against the float64
  reference (every gradient, LSTM/GRU, dropout, ``block_inactive_grad`` both ways) under
  ``TRITON_INTERPRET=1`` on CPU tensors, and at the realistic shape on an H100 (fp32/bf16,
  benchmarks/results/nvidia-h100-session-2026-11-27a-1-pytest.log), where it trained 7x faster
  than the recompute; it stays opt-in because the CUDA ops (``backend="cuda"``) train faster
  still.
  Its bfloat16/float16 gradients use float32 operands throughout (no rounding of gradient
  operands), which is at least as accurate as the reference's rounding but not identical.

Limits of this version: the input term is always the folded ``XW`` (``B*K*n_in*M*G*H`` float32
values per step; the reference unfolds when ``M*D > d_v``). Without saved activations it is made
for a chunk of steps at a time (:data:`XW_CHUNK_BYTES`) on every path: CUDA-graph replay, and
with the ``kernels`` backward, whose sweep recomputes it chunk by chunk in reverse rather than
saving it (it would be 4.3 GB at ``large``). The ``M`` input elements of a step are
one register tile, so large ``M`` costs memory and registers. The time loop launches from Python: at
B=64, H=100 on an H100 a step is ~22 us of GPU time (bfloat16) but ~100 us of wall time.

CUDA graphs (opt-in, ``RIMS_FAST_TRITON_GRAPH=1``): a forward without saved activations and
without dropout on CUDA captures the whole no-save forward once per (shapes, dtype, config,
parameter storage) — the hoisted GEMMs (keys, fold, ``XW`` chunk by chunk) and the ``2T``
launches, the same code as the eager path (:func:`_run_chunked`) — and replays it: ``x`` and the
initial state are copied into the graph's static buffers, the outputs copied out. Parameters are
read in place, so in-place optimizer updates are seen by later replays. Equal to eager launches
on an H100; not the default because each captured graph keeps its own buffers and the first call
per shape pays the capture.

The sequence op is ``torch.library.custom_op("rims_fast::rim_triton_fwd")`` with a fake impl and
``register_autograd``, so ``torch.compile`` sees one node per layer and ``opcheck`` can test it.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import _backend
from ._config import RimConfig, cfg_args, cfg_from
from .reference import _Rounder, compute_dtype, rim_ref
from .row_products import mechanism_rows_product, rows_product

def _import_kernels():
    """``rims_fast.triton_kernels.rim_step_fwd``: from the installed wheel (setup.py maps the
    folder), or in a source checkout from ``<repo>/triton_kernels`` registered under that name (a
    top-level ``triton_kernels`` would be Triton's own package of that name)."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    try:
        return importlib.import_module("rims_fast.triton_kernels.rim_step_fwd")
    except ModuleNotFoundError as e:
        if e.name not in ("rims_fast.triton_kernels", "rims_fast.triton_kernels.rim_step_fwd"):
            raise
    init = Path(__file__).resolve().parent.parent / "triton_kernels" / "__init__.py"
    if not init.is_file():
        raise ImportError(f"rims_fast.triton_kernels is not installed and {init} does not exist")
    spec = importlib.util.spec_from_file_location(
        "rims_fast.triton_kernels", init, submodule_search_locations=[str(init.parent)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["rims_fast.triton_kernels"] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module("rims_fast.triton_kernels.rim_step_fwd")


try:
    _k = _import_kernels()
    import importlib as _importlib

    _kb = _importlib.import_module("rims_fast.triton_kernels.rim_step_bwd")
    _kt = _importlib.import_module("rims_fast.triton_kernels.rim_step_fwd_tiled")
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # triton missing, or the kernels failed to import
    _k = _kb = _kt = None
    _IMPORT_ERROR = e


def _interpreted() -> bool:
    """Whether the Triton kernels run through Triton's interpreter. ``@triton.jit`` reads
    ``TRITON_INTERPRET`` when it decorates: Triton's own library (``tl.sigmoid``, ...) when triton
    is first imported -- by this module, or earlier by anything else (``torch._dynamo`` imports
    it) -- and our kernels when they are imported (their ``_INTERP``). Both must be interpreted;
    setting the variable later gives a mix that fails inside the first launch, so the environment
    read at call time is no answer."""
    if _k is None:
        return False
    try:  # Triton internals (3.x): if they move, report "not interpreted" rather than fail import
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
        interp = _k._INTERP
        return bool(getattr(interp, "value", interp)) and isinstance(standard.zeros,
                                                                     InterpretedFunction)
    except Exception:  # noqa: BLE001
        return False


#: Fixed for the process once the kernels are imported (see :func:`_interpreted`).
_INTERPRETED = _interpreted()

__all__ = ["rim_triton", "unavailable_reason", "RimFn", "PARAM_NAMES"]

#: Parameter order of the op (SPEC.md's table).
PARAM_NAMES = ("input_key", "input_value", "input_query", "weight_ih", "weight_hh", "bias_ih",
               "bias_hh", "comm_query", "comm_key", "comm_value", "comm_output")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# torch.compile evaluates this at trace time: it depends only on the build, device and dtype.
@_backend.assume_constant_result
def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``None`` if the Triton backend can run on tensors of this device and dtype, else why not."""
    if _k is None:
        return f"Triton kernels failed to import: {_IMPORT_ERROR}"
    device = torch.device(device)
    if dtype not in _DTYPES:
        return f"backend='triton' supports float32, bfloat16 and float16, got {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        # The variable is the switch: it must have been 1 when Triton and the kernels were imported
        # (that is what counts, see _interpreted) and at `import rims_fast` (the documented rule,
        # see _backend.TRITON_INTERPRET_AT_IMPORT), and still be 1, so that unsetting it turns the
        # backend off.
        wanted = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if wanted and _INTERPRETED and _backend.TRITON_INTERPRET_AT_IMPORT:
            return None
        if wanted:  # set now, but too late to take effect
            return ("TRITON_INTERPRET=1 was set too late (after `import rims_fast` or after Triton "
                    "was imported); set it before `import rims_fast` and before anything imports "
                    "Triton to run backend='triton' on CPU tensors")
        return ("backend='triton' on CPU tensors needs TRITON_INTERPRET=1, set before "
                "`import rims_fast` and before Triton is imported")
    return f"backend='triton' needs CUDA tensors (or CPU with TRITON_INTERPRET=1), got {device}"


# ------------------------------------------------------------------ config <-> op arguments


_cfg_args, _cfg_from = cfg_args, cfg_from


def _on_device(x: Tensor):
    """Triton launches (and graph capture) use the current CUDA device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


#: ``tl.dot`` precision of float32 products when PyTorch's TF32 is off. Triton's "ieee" float32
#: dot runs on CUDA cores with the weight tile in registers: on an H100 at B=64, K=6, H=100 the
#: cell kernel took 0.70 ms per step with it and 0.075 ms with "tf32x3" (three TF32 tensor-core
#: products with error compensation, float32-level accuracy: the GPU tests pass float32
#: tolerances against the float64 reference, max |out error| 6e-7 at T=20).
FP32_DOT = "tf32x3"


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 products follow PyTorch's TF32 setting (SPEC "Dtypes"): TF32 when allowed, else
    :data:`FP32_DOT`; half-precision operands ignore it."""
    if dtype == torch.float32 and _backend.tf32_matmul():
        return "tf32"
    return FP32_DOT


# ------------------------------------------------------------------ forward (Triton)


def _forward(x: Tensor, h0: Tensor, c0: Optional[Tensor], P: Sequence[Tensor], cfg: RimConfig,
             drop_in: float, drop_c: float, seed: int, save: bool = False) -> tuple[Tensor, ...]:
    """Triton forward. Returns ``out, h_n, c_n, masks`` and the :data:`SAVED` tensors (empty
    unless ``save``)."""
    T, B, M, D = x.shape
    K, H = cfg.num_units, cfg.hidden_size
    NI = cfg.input_heads
    NC, DC, DCV = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
    lstm = cfg.cell == "lstm"
    dtype, dev = x.dtype, x.device
    ct = compute_dtype(dtype)
    rnd = _Rounder(dtype)
    p = dict(zip(PARAM_NAMES, (t.contiguous() for t in P)))
    x = x.contiguous()
    f32 = dict(device=dev, dtype=torch.float32)

    xc = x.to(ct)
    tiles = _tiles_for(B, H, dtype) if fwd_mode() == "tiled" else None
    if (not save and graph_mode() and x.is_cuda and drop_in == 0 and drop_c == 0
            and not torch.cuda.is_current_stream_capturing()):  # no capture inside a capture
        return _graph_forward(x, xc, h0, c0, p, cfg, tiles)
    tiled = _Tiled(B, M, cfg, dev, tiles) if tiles is not None else None
    keys, fold = _hoisted(xc, p, cfg, rnd)
    if save:  # per-step histories: the kernels write step t's results straight into slot t
        hs = torch.empty(T + 1, B, K, H, **f32)
        hs[0] = h0
        cs = torch.empty(T + 1, B, K, H, **f32) if lstm else hs.new_empty(0)
        if lstm:
            cs[0] = c0
        hts = torch.empty(T, B, K, H, **f32)
        qcs = torch.empty(T, B, K, NC * DC, **f32)
        kcs = torch.empty_like(qcs)
        vcs = torch.empty(T, B, K, NC * DCV, **f32)
        gates = torch.empty(T, B, K, (4 if lstm else 6) * H, **f32)
        a_s = torch.empty(T, B, K, NI, M, **f32)
        bps = torch.empty(T, B, K, NC, K, **f32)
        os_ = torch.empty(T, B, K, NC * DCV, **f32)
    else:  # workspaces reused every step: float32 carried state (ping-pong for c), h~, Q/K/V
        h = h0.to(torch.float32).contiguous().clone()
        c_a = (c0.to(torch.float32).contiguous().clone() if lstm else h.new_empty(0))
        c_b = torch.empty_like(c_a)
        ht = torch.empty(B, K, H, **f32)
        qc = torch.empty(B, K, NC * DC, **f32)
        kc = torch.empty_like(qc)
        vc = torch.empty(B, K, NC * DCV, **f32)
    out = torch.empty(T, B, K * H, device=dev, dtype=dtype)
    masks = torch.empty(T, B, K, device=dev, dtype=torch.int8)
    prec = _dot_precision(dtype)
    if save:  # XW in chunks here too: the backward recomputes it chunk by chunk (not saved)
        for t0, t1 in _chunks(T, B, M, cfg):
            xw = None  # the previous chunk freed before the next is made
            xw = _xw(xc[t0:t1], fold)
            for t in range(t0, t1):
                _launch_step(t, hs[t], cs[t] if lstm else cs, cs[t + 1] if lstm else cs,
                             hs[t + 1], hts[t], qcs[t], kcs[t], vcs[t], keys, xw, masks, out, p,
                             cfg, M, seed, drop_in, drop_c, prec, dict(gates=gates, a=a_s),
                             dict(bp=bps, o=os_), t_xw=t - t0, tiled=tiled)
    else:
        c_a, c_b = _run_chunked(xc, fold, h, c_a, c_b, ht, qc, kc, vc, keys, masks, out, p, cfg,
                                seed, drop_in, drop_c, prec, tiled)
    if save:
        h_n = hs[T].to(dtype, copy=True)  # not a view of the saved hs (ops may not alias)
        c_n = cs[T].to(dtype, copy=True) if lstm else x.new_empty(0)
        saved = (hs, cs, hts, qcs, kcs, vcs, gates, a_s, bps, os_, keys.float(),
                 x.new_empty(0, dtype=torch.float32))
    else:
        h_n = h.to(dtype)
        c_n = c_a.to(dtype) if lstm else x.new_empty(0)
        saved = tuple(x.new_empty(0, dtype=torch.float32) for _ in SAVED)
    return (out, h_n, c_n, masks.bool(), *saved)


def _hoisted(xc: Tensor, p, cfg: RimConfig, rnd: _Rounder) -> tuple[Tensor, Tensor]:
    """State-independent work of all steps (PyTorch GEMMs, float32 accumulation): the input keys
    ``(T, B, M, NI*DK)`` and the fold ``input_value_n weight_ih[k]_n`` ``(K, NI, D, G*H)``."""
    return rnd(xc @ p["input_key"].to(xc.dtype)).contiguous(), _fold(p, cfg, xc.dtype, rnd)


def _fold(p, cfg: RimConfig, ct: torch.dtype, rnd: _Rounder) -> Tensor:
    """``input_value_n weight_ih[k]_n``: ``(K, NI, D, G*H)`` in the compute dtype ``ct``."""
    K, NI, DV = cfg.num_units, cfg.input_heads, cfg.input_value_size
    D, GH = p["input_value"].shape[0], cfg.gates * cfg.hidden_size
    return rnd(torch.einsum("dnv,knvg->kndg", p["input_value"].to(ct).view(D, NI, DV),
                            p["weight_ih"].to(ct).view(K, NI, DV, GH)))


def _xw(xc: Tensor, fold: Tensor) -> Tensor:
    """The folded input term of the steps in ``xc``: ``(T', B, K, NI, M, G*H)``."""
    return torch.einsum("tbmd,kndg->tbknmg", xc, fold).contiguous()


def _chunks(T: int, B: int, M: int, cfg: RimConfig) -> list[tuple[int, int]]:
    """Step ranges ``[t0, t1)`` whose ``XW`` fits :data:`XW_CHUNK_BYTES` (at least one step)."""
    step_bytes = 4 * B * cfg.num_units * cfg.input_heads * M * cfg.gates * cfg.hidden_size
    chunk = max(1, min(T, XW_CHUNK_BYTES // step_bytes))
    return [(t0, min(T, t0 + chunk)) for t0 in range(0, T, chunk)]


def _run_chunked(xc, fold, h, c_a, c_b, ht, qc, kc, vc, keys, masks, out, p, cfg, seed, drop_in,
                 drop_c, prec, tiled=None) -> tuple[Tensor, Tensor]:
    """The no-save forward's steps on reused workspaces (:func:`_run_steps`), ``XW`` made for a
    chunk of steps at a time: memory bounded by :data:`XW_CHUNK_BYTES`, not linear in ``T``.
    Shared by the eager forward and the CUDA-graph capture."""
    T, B, M = xc.shape[:3]
    for t0, t1 in _chunks(T, B, M, cfg):
        c_a, c_b = _run_steps(h, c_a, c_b, ht, qc, kc, vc, keys, _xw(xc[t0:t1], fold), masks,
                              out, p, cfg, M, seed, drop_in, drop_c, prec, range(t0, t1), tiled)
    return c_a, c_b


class _Tiled:
    """What the tiled forward (:func:`fwd_mode` ``"tiled"``) adds to a call: the per-step
    workspaces ``p`` ``(B, K)`` and ``a`` ``(B, K, NI, M)`` (the saved ``a[t]`` replaces the latter
    when the forward saves) and the tile sizes (:func:`rim_step_fwd_tiled.tile_sizes`)."""

    def __init__(self, B: int, M: int, cfg: RimConfig, device, tiles):
        f32 = dict(device=device, dtype=torch.float32)
        self.p = torch.empty(B, cfg.num_units, **f32)
        self.a = torch.empty(B, cfg.num_units, cfg.input_heads, M, **f32)
        self.tiles = tiles


def _tiles_for(B: int, H: int, dtype: torch.dtype):
    """The tiled forward's tiles: ``RIMS_FAST_TRITON_TILES`` if set, else the defaults."""
    return tiles_override() or _kt.tile_sizes(B, H, dtype == torch.float32)


def _launch_step(t, h_in, c_in, c_out, h_out, ht, qc, kc, vc, keys, xw, masks, out, p, cfg, M,
                 seed, drop_in, drop_c, prec, extra_cell=None, extra_comm=None, t_xw=None,
                 tiled: Optional[_Tiled] = None) -> None:
    """The kernels of step ``t``: cell and communication, or with ``tiled`` the query, gates
    and Q|K|V kernels of ``rim_step_fwd_tiled`` then the communication; ``extra_*``: the save
    buffers; ``t_xw``: the step's index in ``xw`` (default ``t``)."""
    K, H, lstm = cfg.num_units, cfg.hidden_size, cfg.cell == "lstm"
    NC, DC, DCV = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
    if tiled is not None:
        _launch_tiled(t, h_in, c_in, c_out, ht, qc, kc, vc, keys, xw, masks, p, cfg, M, seed,
                      drop_in, prec, extra_cell or {}, t_xw, tiled)
    else:
        _k.rim_cell_fwd(h_in, c_in, keys, xw, p["input_query"], p["weight_hh"],
                        p["bias_ih"], p["bias_hh"], p["comm_query"], p["comm_key"],
                        p["comm_value"], ht, c_out, masks, qc, kc, vc, t=t, M=M, K=K, H=H,
                        NI=cfg.input_heads, DK=cfg.input_key_size, NC=NC, DC=DC, DCV=DCV,
                        top_k=cfg.top_k, lstm=lstm, seed=seed, p_drop=drop_in, prec=prec,
                        t_xw=t_xw, **(extra_cell or {}))
    _k.rim_comm_fwd(ht, masks, qc, kc, vc, p["comm_output"], h_out, out, t=t, K=K, H=H, NC=NC,
                    DC=DC, DCV=DCV, seed=seed + 1, p_drop=drop_c, prec=prec, **(extra_comm or {}))


def _launch_tiled(t, h_in, c_in, c_out, ht, qc, kc, vc, keys, xw, masks, p, cfg, M, seed, drop_in,
                  prec, save, t_xw, tiled: _Tiled) -> None:
    """Steps 1-4a of step ``t`` as three column-tiled kernels (``save``: the ``gates``/``a``
    histories, as the fused cell kernel's)."""
    K, H, NI, lstm = cfg.num_units, cfg.hidden_size, cfg.input_heads, cfg.cell == "lstm"
    a_t = save["a"][t] if "a" in save else tiled.a
    tiles = tiled.tiles
    _kt.rim_query_fwd(h_in, keys, p["input_query"], tiled.p, a_t, t=t, M=M, K=K, H=H, NI=NI,
                      DK=cfg.input_key_size, prec=prec, tiles=tiles)
    _kt.rim_gates_fwd(h_in, c_in, tiled.p, a_t, xw, p["weight_hh"], p["bias_ih"], p["bias_hh"],
                      ht, c_out, masks, t=t, M=M, K=K, H=H, NI=NI, top_k=cfg.top_k, lstm=lstm,
                      seed=seed, p_drop=drop_in, prec=prec, tiles=tiles,
                      gates=save.get("gates"), t_xw=t_xw)
    _kt.rim_comm_qkv_fwd(ht, p["comm_query"], p["comm_key"], p["comm_value"], qc, kc, vc, K=K,
                         H=H, NC=cfg.comm_heads, DC=cfg.comm_key_size,
                         DCV=cfg.comm_value_size, prec=prec, tiles=tiles)


#: Bytes of the folded input term ``XW`` the no-save forward materialises at once: it is made
#: for a chunk of steps at a time (``large``: 8.4 MB per step, so 30 steps instead of all 512).
XW_CHUNK_BYTES = 256 << 20


def _run_steps(h, c_a, c_b, ht, qc, kc, vc, keys, xw, masks, out, p, cfg, M, seed, drop_in,
               drop_c, prec, steps=None, tiled=None) -> tuple[Tensor, Tensor]:
    """Steps ``steps`` (default all) on reused workspaces (``h`` in place, ``c`` ping-pong);
    ``xw`` holds exactly those steps. Returns ``(c_a, c_b)`` swapped as the steps left them:
    ``c_a`` holds the latest ``c`` (for GRU both are unused)."""
    steps = range(keys.shape[0]) if steps is None else steps
    for t in steps:
        _launch_step(t, h, c_a, c_b, h, ht, qc, kc, vc, keys, xw, masks, out, p, cfg, M, seed,
                     drop_in, drop_c, prec, t_xw=t - steps[0], tiled=tiled)
        if cfg.cell == "lstm":
            c_a, c_b = c_b, c_a
    return c_a, c_b


# ------------------------------------------------------------------ CUDA-graph replay (opt-in)


def graph_mode() -> bool:
    """``RIMS_FAST_TRITON_GRAPH=1``: the no-grad, dropout-free forward on CUDA replays a captured
    CUDA graph of its ``2T`` launches (one graph per shapes, config and parameter storage)."""
    v = os.environ.get("RIMS_FAST_TRITON_GRAPH", "0")
    if v not in ("0", "1"):
        raise ValueError(f"RIMS_FAST_TRITON_GRAPH must be 0 or 1, got {v!r}")
    return v == "1"


class _Captured:
    """One captured forward: the hoisted GEMMs (keys, fold, the input term in chunks of steps)
    and the 2T launches, exactly :func:`_run_chunked` as the eager forward runs it. Its static
    input (``x`` in the compute dtype, the initial state), workspaces and outputs, and the
    parameters it reads are all held here: a CUDA graph keeps no reference to the memory its
    kernels use, so anything freed would be overwritten by later replays (tensors allocated
    during capture live in the graph's private pool)."""

    def __init__(self, xc, h0, c0, p, cfg, prec, out_dtype, tiles):
        self.p = p
        f32 = dict(device=xc.device, dtype=torch.float32)
        T, B = xc.shape[:2]
        K, H, NC = cfg.num_units, cfg.hidden_size, cfg.comm_heads
        self.xc = torch.empty_like(xc)
        self.h = torch.empty(B, K, H, **f32)
        lstm = cfg.cell == "lstm"
        self.c_a = torch.empty(B, K, H, **f32) if lstm else self.h.new_empty(0)
        c_b = torch.empty_like(self.c_a)
        ht = torch.empty(B, K, H, **f32)
        qc = torch.empty(B, K, NC * cfg.comm_key_size, **f32)
        kc = torch.empty_like(qc)
        vc = torch.empty(B, K, NC * cfg.comm_value_size, **f32)
        self.out = torch.empty(T, B, K * H, device=xc.device, dtype=out_dtype)
        self.masks = torch.empty(T, B, K, device=xc.device, dtype=torch.int8)
        rnd = _Rounder(out_dtype)
        self.work = (self.h, self.c_a, c_b, ht, qc, kc, vc)  # alive as long as the graph
        self.tiled = _Tiled(B, xc.shape[2], cfg, xc.device, tiles) if tiles is not None else None

        def body():
            keys, fold = _hoisted(self.xc, p, cfg, rnd)
            return _run_chunked(self.xc, fold, *self.work, keys, self.masks, self.out, p, cfg, 0,
                                0.0, 0.0, prec, self.tiled)[0]

        self.fill(xc, h0, c0)
        side = torch.cuda.Stream(device=xc.device)  # warm-up: Triton compiles, cuBLAS sets up
        side.wait_stream(torch.cuda.current_stream(xc.device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(xc.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.c_final = body()

    def fill(self, xc, h0, c0) -> None:
        self.xc.copy_(xc)
        self.h.copy_(h0)
        if c0 is not None:
            self.c_a.copy_(c0)


_GRAPHS: "collections.OrderedDict[tuple, _Captured]" = collections.OrderedDict()
_GRAPHS_MAX = 8  # captured forwards kept (each holds its buffers); least recently used out


def _graph_forward(x, xc, h0, c0, p, cfg, tiles) -> tuple[Tensor, ...]:
    lstm = cfg.cell == "lstm"
    prec = _dot_precision(x.dtype)
    # The captured float32 GEMMs (keys, fold, XW) follow the TF32 setting of capture time.
    key = (tuple(x.shape), x.dtype, x.device, cfg, prec, tiles,  # tiles: None when fused
           _backend.tf32_matmul(), torch.is_inference_mode_enabled(),
           torch.cuda.current_stream(x.device).cuda_stream,
           tuple((n, t.data_ptr(), tuple(t.shape)) for n, t in p.items()))
    cap = _GRAPHS.get(key)
    if cap is None:
        while len(_GRAPHS) >= _GRAPHS_MAX:
            _GRAPHS.popitem(last=False)
        cap = _GRAPHS[key] = _Captured(xc, h0, c0 if lstm else None, p, cfg, prec, x.dtype,
                                       tiles)
    _GRAPHS.move_to_end(key)
    cap.fill(xc, h0, c0 if lstm else None)
    cap.graph.replay()
    # Copies: the next replay overwrites the static buffers.
    c_n = cap.c_final.to(x.dtype, copy=True) if lstm else x.new_empty(0)
    saved = tuple(x.new_empty(0, dtype=torch.float32) for _ in SAVED)
    return (cap.out.clone(), cap.h.to(x.dtype, copy=True), c_n, cap.masks.bool(), *saved)


#: Names of the activations the forward saves for the Triton backward (float32, all steps).
SAVED = ("hs", "cs", "hts", "qc", "kc", "vc", "gates", "a", "bp", "o", "keys", "xw")


def _saved_shapes(T, B, M, cfg: RimConfig) -> list[tuple[int, ...]]:
    K, H, NI, DK = cfg.num_units, cfg.hidden_size, cfg.input_heads, cfg.input_key_size
    NC, DC, DCV = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
    lstm = cfg.cell == "lstm"
    return [(T + 1, B, K, H), (T + 1, B, K, H) if lstm else (0,), (T, B, K, H),
            (T, B, K, NC * DC), (T, B, K, NC * DC), (T, B, K, NC * DCV),
            (T, B, K, (4 if lstm else 6) * H), (T, B, K, NI, M), (T, B, K, NC, K),
            (T, B, K, NC * DCV), (T, B, M, NI * DK), (0,)]  # XW: recomputed, not saved


def fwd_mode() -> str:
    """``RIMS_FAST_TRITON_FWD``: ``"fused"`` (default: two kernels per step, a program computing
    all of one mechanism's gate columns) or ``"tiled"`` (four kernels per step, the gate products
    on a grid over batch tile x mechanism x unit tile: :mod:`rim_step_fwd_tiled`)."""
    mode = os.environ.get("RIMS_FAST_TRITON_FWD", "fused")
    if mode not in ("fused", "tiled"):
        raise ValueError(f"RIMS_FAST_TRITON_FWD must be 'fused' or 'tiled', got {mode!r}")
    return mode


def tiles_override():
    """``RIMS_FAST_TRITON_TILES=block_b,block_u,block_k,num_warps`` (for tuning runs): the tiled
    forward's tiles instead of :func:`rim_step_fwd_tiled.tile_sizes`; unset: ``None``."""
    v = os.environ.get("RIMS_FAST_TRITON_TILES", "")
    if not v:
        return None
    try:
        bb, bu, bk, w = (int(s) for s in v.split(","))
    except ValueError:
        raise ValueError(f"RIMS_FAST_TRITON_TILES must be four integers "
                         f"block_b,block_u,block_k,num_warps, got {v!r}") from None
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0
    if not (pow2(bb) and pow2(bu) and pow2(bk) and w in (1, 2, 4, 8, 16)):
        raise ValueError(f"RIMS_FAST_TRITON_TILES: tile sizes must be powers of two >= 16 (tl.dot) "
                         f"and num_warps one of 1, 2, 4, 8, 16, got {v!r}")
    return _kt.Tiles(bb, bu, bk, w)


def bwd_mode() -> str:
    """``RIMS_FAST_TRITON_BWD``: ``"recompute"`` (default) or ``"kernels"``."""
    mode = os.environ.get("RIMS_FAST_TRITON_BWD", "recompute")
    if mode not in ("recompute", "kernels"):
        raise ValueError(f"RIMS_FAST_TRITON_BWD must be 'recompute' or 'kernels', got {mode!r}")
    return mode


# ------------------------------------------------------------------ backward (recompute)


def _dropout_keep(cfg: RimConfig, T: int, B: int, M: int, seed: int, device) -> tuple:
    """The forward's dropout keep-masks, regenerated from the same Triton stream:
    input ``(T, B, K, n_in, M)``, communication ``(T, B, K, n_c, K)`` (``None`` when off)."""
    K = cfg.num_units
    keep_in = keep_c = None
    if cfg.input_dropout > 0:
        keep_in = _k.rim_dropout_masks((T, B, K, cfg.input_heads, M), seed, cfg.input_dropout, device)
    if cfg.comm_dropout > 0:
        keep_c = _k.rim_dropout_masks((T, B, K, cfg.comm_heads, K), seed + 1, cfg.comm_dropout, device)
    return keep_in, keep_c


def _dropping(cfg: RimConfig, training: bool) -> bool:
    return training and (cfg.input_dropout > 0 or cfg.comm_dropout > 0)


# ------------------------------------------------------------------ backward (Triton kernels)


@torch.library.custom_op("rims_fast::rim_triton_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def rim_triton_bwd(g_out: Optional[Tensor], g_hn: Optional[Tensor], g_cn: Optional[Tensor],
                   x: Tensor, h0: Tensor, c0: Optional[Tensor], params: list[Tensor],
                   masks: Tensor, saved: list[Tensor], sizes: list[int], cell: str,
                   input_dropout: float, comm_dropout: float, block_inactive_grad: bool,
                   training: bool, seed: int) -> list[Tensor]:
    """Gradients ``[dx, dh0, dc0 (empty if no c0), *d params]`` from the forward's :data:`SAVED`
    activations: a reverse sweep with :mod:`rim_step_bwd` (two kernels per step), then the
    weight gradients as PyTorch GEMMs over all ``T*B`` rows."""
    cfg = _cfg_from(sizes, cell, input_dropout, comm_dropout, block_inactive_grad)
    with _on_device(x):
        res = _backward_sweep(cfg, training, seed, g_out, g_hn, g_cn, x, h0, c0, params, masks,
                              saved)
    return list(res)


@rim_triton_bwd.register_fake
def _(g_out, g_hn, g_cn, x, h0, c0, params, masks, saved, sizes, cell, input_dropout,
      comm_dropout, block_inactive_grad, training, seed):
    return [torch.empty_like(x), torch.empty_like(h0),
            torch.empty_like(c0) if c0 is not None else x.new_empty(0),
            *(torch.empty_like(p) for p in params)]


def _backward_sweep(cfg: RimConfig, training: bool, seed: int, g_out: Optional[Tensor],
                    g_hn: Optional[Tensor], g_cn: Optional[Tensor], x: Tensor, h0: Tensor,
                    c0: Optional[Tensor], params: Sequence[Tensor], masks: Tensor,
                    saved: Sequence[Tensor]) -> list[Tensor]:
    hs, cs, hts, qcs, kcs, vcs, gates, a_s, bps, os_, keys, _ = (t.contiguous() for t in saved)
    p = dict(zip(PARAM_NAMES, (t.contiguous() for t in params)))
    T, B, M, D = x.shape
    K, H = cfg.num_units, cfg.hidden_size
    NI, DK, DV = cfg.input_heads, cfg.input_key_size, cfg.input_value_size
    NC, DC, DCV = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
    lstm = cfg.cell == "lstm"
    GH = cfg.gates * H
    dtype, dev = x.dtype, x.device
    ct = compute_dtype(dtype)
    rnd = _Rounder(dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    drop_in = cfg.input_dropout if training else 0.0
    drop_c = cfg.comm_dropout if training else 0.0
    prec = _dot_precision(dtype)

    # Carried gradients of h_t (out[T-1]'s included) and c_t; per-step gradient buffers.
    gout = g_out.to(torch.float32).contiguous() if g_out is not None else None
    dh = (g_hn.to(torch.float32).contiguous().clone() if g_hn is not None
          else torch.zeros(B, K, H, **f32))
    if gout is not None:
        dh += gout[T - 1].view(B, K, H)
    if lstm:
        dc = (g_cn.to(torch.float32).contiguous().clone() if g_cn is not None and g_cn.numel()
              else torch.zeros(B, K, H, **f32))
    else:
        dc = dh.new_empty(0)
    m8 = masks.to(torch.int8).contiguous()
    do_ws = torch.empty(B, K, NC * DCV, **f32)
    ds_ws = torch.empty(B, K, NC, K, **f32)
    d_hp = torch.empty(T, B, K, H, **f32)
    d_qc = torch.empty(T, B, K, NC * DC, **f32)
    d_kc = torch.empty_like(d_qc)
    d_vc = torch.empty(T, B, K, NC * DCV, **f32)
    d_g = torch.empty(T, B, K, gates.shape[-1], **f32)
    d_qi = torch.empty(T, B, K, NI * DK, **f32)
    d_si = torch.empty(T, B, K, NI, M, **f32)
    # XW again, chunk by chunk in reverse (the forward's chunks and arithmetic: bit-identical).
    xc, fold = x.contiguous().to(ct), _fold(p, cfg, ct, rnd)  # as the forward made them
    chunks, xw, t0 = _chunks(T, B, M, cfg), None, T
    for t in reversed(range(T)):
        if t < t0:
            t0, t1 = next((a, b) for a, b in chunks if a <= t < b)
            xw = None  # the previous chunk freed before the next is made
            xw = _xw(xc[t0:t1], fold)
        _kb.rim_comm_bwd(dh, m8, qcs, kcs, vcs, bps, p["comm_output"], d_hp, do_ws, ds_ws, d_qc,
                         t=t, K=K, H=H, NC=NC, DC=DC, DCV=DCV, seed=seed + 1, p_drop=drop_c,
                         prec=prec)
        _kb.rim_cell_bwd(dh, dc if lstm else dh, gout if gout is not None else dh, m8, hs,
                         cs if lstm else hs, gates, a_s, keys, xw, qcs, bps, do_ws, ds_ws, d_qc,
                         p["input_query"], p["weight_hh"], p["comm_query"], p["comm_key"],
                         p["comm_value"], d_kc, d_vc, d_g, d_qi, d_si, t=t, M=M, K=K, H=H, NI=NI,
                         DK=DK, NC=NC, DC=DC, DCV=DCV, lstm=lstm,
                         block_inactive_grad=cfg.block_inactive_grad,
                         has_gout=gout is not None and t > 0, seed=seed, p_in=drop_in,
                         p_c=drop_c, prec=prec, t_xw=t - t0)
    xw = None

    # Weight gradients: GEMMs over all T*B rows (deterministic; float32 accumulation).
    P = {n: t.to(ct) for n, t in p.items()}
    hprev = rnd(hs[:T])  # (T, B, K, H): h_{t-1} of every step
    d_gi = d_g[..., :GH]
    d_gh = d_g if lstm else d_g[..., GH:]
    g = {}
    g["input_query"] = mechanism_rows_product(hprev, d_qi)
    g["weight_hh"] = mechanism_rows_product(hprev, d_gh)
    g["bias_hh"] = d_gh.sum((0, 1))
    g["bias_ih"] = d_gi.sum((0, 1))
    htr = rnd(hts)
    g["comm_query"] = mechanism_rows_product(htr, d_qc)
    g["comm_key"] = mechanism_rows_product(htr, d_kc)
    g["comm_value"] = mechanism_rows_product(htr, d_vc)
    g["comm_output"] = mechanism_rows_product(os_, d_hp)
    # Input keys (hoisted x @ input_key): d key from the scaled score gradients and the queries.
    q = rnd(torch.einsum("tbkh,khe->tbke", hprev, P["input_query"])).view(T, B, K, NI, DK)
    d_key = torch.einsum("tbknm,tbkne->tbmne", d_si, q).reshape(T, B, M, NI * DK)
    g["input_key"] = rows_product(xc, d_key)
    dx = d_key @ P["input_key"].t()
    # Folded input term XW = x (input_value_n weight_ih[k]_n): through the dropped probabilities.
    at = a_s
    if drop_in > 0:
        keep = _k.rim_dropout_masks((T, B, K, NI, M), seed, drop_in, dev)
        at = torch.where(keep, a_s / (1.0 - drop_in), 0.0)
    at = rnd(at)
    xa = torch.einsum("tbknm,tbmd->tbknd", at, xc)
    g_fold = mechanism_rows_product(xa.reshape(T, B, K, NI * D), d_gi).view(K, NI, D, GH)
    dxa = torch.einsum("tbkg,kndg->tbknd", d_gi, fold)
    dx += torch.einsum("tbknm,tbknd->tbmd", at, dxa)
    g["input_value"] = torch.einsum("kndg,knvg->dnv", g_fold,
                                    P["weight_ih"].view(K, NI, DV, GH)).reshape(D, NI * DV)
    g["weight_ih"] = torch.einsum("dnv,kndg->knvg", P["input_value"].view(D, NI, DV),
                                  g_fold).reshape(K, NI * DV, GH)

    g_c0 = dc.to(c0.dtype) if lstm and c0 is not None else x.new_empty(0)
    res = [dx.to(dtype), dh.to(h0.dtype), g_c0, *(g[n].to(p[n].dtype) for n in PARAM_NAMES)]
    return [r.contiguous() for r in res]  # einsum results may be permuted views


def _unpack_saved(ctx) -> tuple:
    """``(x, h0, c0 or None, params, masks, activations)`` as ``_setup_context`` saved them."""
    saved = ctx.saved_tensors
    x, h0 = saved[0], saved[1]
    i = 3 if ctx.has_c0 else 2
    c0 = saved[2] if ctx.has_c0 else None
    params = list(saved[i:i + ctx.n_params])
    return x, h0, c0, params, saved[i + ctx.n_params], list(saved[i + ctx.n_params + 1:])


def _backward_kernels(ctx, g_out: Optional[Tensor], g_hn: Optional[Tensor],
                      g_cn: Optional[Tensor]) -> tuple:
    x, h0, c0, params, masks, acts = _unpack_saved(ctx)
    sizes, cell, p_in, p_c, big = _cfg_args(ctx.cfg)
    if ctx.cfg.cell != "lstm":
        g_cn = None
    res = rim_triton_bwd(g_out, g_hn, g_cn, x, h0, c0, params, masks, acts, sizes, cell, p_in,
                         p_c, big, ctx.training, ctx.seed)
    g_c0 = res[2] if c0 is not None else None
    return (res[0], res[1], g_c0, list(res[3:]), None, None, None, None, None, None, None, None)


# ------------------------------------------------------------------ the op


@torch.library.custom_op("rims_fast::rim_triton_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def rim_triton_fwd(x: Tensor, h0: Tensor, c0: Optional[Tensor], params: list[Tensor],
                   sizes: list[int], cell: str, input_dropout: float, comm_dropout: float,
                   block_inactive_grad: bool, training: bool, seed: int, save: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                              Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole sequence. ``c_n`` is an empty tensor for GRU (ops cannot return ``None``).
    Returns ``out, h_n, c_n, masks`` and the 12 :data:`SAVED` activations (empty unless ``save``)."""
    cfg = _cfg_from(sizes, cell, input_dropout, comm_dropout, block_inactive_grad)
    drop_in = input_dropout if training else 0.0
    drop_c = comm_dropout if training else 0.0
    with _on_device(x):
        return _forward(x, h0, c0, params, cfg, drop_in, drop_c, seed, save)


@rim_triton_fwd.register_fake
def _(x, h0, c0, params, sizes, cell, input_dropout, comm_dropout, block_inactive_grad, training,
      seed, save):
    T, B, M, D = x.shape
    H, K = sizes[1], sizes[2]
    out = x.new_empty(T, B, K * H)
    h_n = x.new_empty(B, K, H)
    c_n = x.new_empty(B, K, H) if cell == "lstm" else x.new_empty(0)
    cfg = _cfg_from(sizes, cell, input_dropout, comm_dropout, block_inactive_grad)
    shapes = _saved_shapes(T, B, M, cfg) if save else [(0,)] * len(SAVED)
    saved = [x.new_empty(s, dtype=torch.float32) for s in shapes]
    return (out, h_n, c_n, x.new_empty(T, B, K, dtype=torch.bool), *saved)


def _setup_context(ctx, inputs, output):
    x, h0, c0, params, sizes, cell, input_dropout, comm_dropout, big, training, seed, save = inputs
    ctx.cfg = _cfg_from(sizes, cell, input_dropout, comm_dropout, big)
    ctx.training, ctx.seed = training, seed
    ctx.has_c0 = c0 is not None
    ctx.n_params = len(params)
    ctx.kernels = bool(save)
    ctx.mark_non_differentiable(output[3], *output[4:])
    ctx.save_for_backward(x, h0, *([c0] if c0 is not None else []), *params, output[3],
                          *(output[4:] if save else ()))


def _backward(ctx, g_out, g_hn, g_cn, g_masks, *g_saved):
    if ctx.kernels:
        return _backward_kernels(ctx, g_out, g_hn, g_cn)
    x, h0, c0, params, masks, _ = _unpack_saved(ctx)
    cfg = ctx.cfg
    lstm = cfg.cell == "lstm"
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (x, h0, *([c0] if lstm and c0 is not None else []), *params)]
        xs, h0s = leaves[0], leaves[1]
        c0s = leaves[2] if lstm and c0 is not None else None
        ps = leaves[-ctx.n_params:]
        named = dict(zip(PARAM_NAMES, ps))
        keep = None
        if _dropping(cfg, ctx.training):  # replay the forward's own draw in the recompute
            T, B, M, _ = x.shape
            keep = _dropout_keep(cfg, T, B, M, ctx.seed, x.device)
        out, h_n, c_n, _ = rim_ref(xs, h0s, c0s, named, cfg, masks=masks,
                                   training=keep is not None, dropout_masks=keep)
        outs, grads = [out, h_n], [g_out, g_hn]
        if lstm:
            outs.append(c_n)
            grads.append(g_cn)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        res = torch.autograd.grad([o for o, _ in pairs], leaves,
                                  [g.contiguous() for _, g in pairs], allow_unused=True)
    res = [torch.zeros_like(l) if r is None else r for r, l in zip(res, leaves)]
    g_x, g_h0 = res[0], res[1]
    g_c0 = res[2] if lstm and c0 is not None else None
    g_params = list(res[-ctx.n_params:])
    return g_x, g_h0, g_c0, g_params, None, None, None, None, None, None, None, None


rim_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


class RimFn:
    """The autograd function of ``backend="triton"``: ``RimFn.apply(...)`` is the custom op
    ``rims_fast::rim_triton_fwd`` (forward: Triton kernels; backward: recompute, see module doc)."""

    apply = staticmethod(rim_triton_fwd)


def rim_triton(x: Tensor, h0: Tensor, c0: Optional[Tensor], params: Mapping[str, Tensor],
               cfg: RimConfig, *, training: bool = False
               ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """Same signature, semantics and layouts as :func:`rims_fast.reference.rim_ref` (without the
    reference-only ``masks=`` / cell hooks): ``x (T, B, M, D)``, ``h0``/``c0`` ``(B, K, H)`` (``c0``
    ``None`` for GRU) -> ``out (T, B, K*H)``, ``h_n``, ``c_n`` (``None`` for GRU), ``masks (T, B, K)``."""
    sizes, cell, p_in, p_c, big = _cfg_args(cfg)
    seed = 0
    if _dropping(cfg, training):  # one draw per call from PyTorch's (CPU) generator: no device sync
        seed = int(torch.randint(0, 2 ** 31 - 2, (1,)).item())
    plist = [params[name] for name in PARAM_NAMES]
    c0 = c0 if cfg.cell == "lstm" else None
    # Save the activations for the Triton backward only when it will run (mode "kernels" and a
    # gradient is required); the recompute backward needs nothing beyond the inputs and masks.
    save = (bwd_mode() == "kernels" and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (x, h0, c0, *plist)))
    out, h_n, c_n, masks = rim_triton_fwd(x, h0, c0, plist, sizes, cell, p_in, p_c, big,
                                          bool(training), seed, save)[:4]
    return out, h_n, (c_n if cfg.cell == "lstm" else None), masks
