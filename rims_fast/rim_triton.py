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
- **Backward — recompute in PyTorch**: :class:`RimFn`'s backward re-runs
  :func:`rims_fast.reference.rim_ref` under autograd with ``masks=`` the forward's masks (so the
  selection is identical) and differentiates it. With dropout in training mode, the forward's
  dropout keep-masks are regenerated from the same counter-based Triton stream
  (``_rim_dropout_masks_fwd_kernel``: same seed, same ``(t, b, k, n, m|j)`` offsets) and the
  recompute hands them to ``rim_ref(dropout_masks=...)``. No Triton backward kernels yet.

Limits of this version: the input term is always the folded ``XW`` (``T*B*K*n_in*M*G*H`` float32
values; the reference unfolds when ``M*D > d_v``), and the ``M`` input elements of a step are one
register tile, so large ``M`` costs memory and registers. The time loop launches from Python: at
B=64, H=100 on an H100 a step is ~22 us of GPU time (bfloat16) but ~100 us of wall time.

The sequence op is ``torch.library.custom_op("rims_fast::rim_triton_fwd")`` with a fake impl and
``register_autograd``, so ``torch.compile`` sees one node per layer and ``opcheck`` can test it.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from ._config import RimConfig
from .reference import _Rounder, compute_dtype, rim_ref

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
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # triton missing, or the kernels failed to import
    _k = None
    _IMPORT_ERROR = e

__all__ = ["rim_triton", "unavailable_reason", "RimFn", "PARAM_NAMES"]

#: Parameter order of the op (SPEC.md's table).
PARAM_NAMES = ("input_key", "input_value", "input_query", "weight_ih", "weight_hh", "bias_ih",
               "bias_hh", "comm_query", "comm_key", "comm_value", "comm_output")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)"
    return f"backend='triton' needs CUDA tensors (or CPU with TRITON_INTERPRET=1), got {device}"


# ------------------------------------------------------------------ config <-> op arguments


def _cfg_args(cfg: RimConfig) -> tuple[list[int], str, float, float, bool]:
    sizes = [cfg.input_size, cfg.hidden_size, cfg.num_units, cfg.top_k, cfg.input_heads,
             cfg.input_key_size, cfg.input_value_size, cfg.comm_heads, cfg.comm_key_size,
             cfg.comm_value_size]
    return sizes, cfg.cell, float(cfg.input_dropout), float(cfg.comm_dropout), cfg.block_inactive_grad


def _cfg_from(sizes: Sequence[int], cell: str, input_dropout: float, comm_dropout: float,
              block_inactive_grad: bool) -> RimConfig:
    D, H, K, top_k, n_in, d_k, d_v, n_c, d_c, d_cv = (int(s) for s in sizes)
    return RimConfig(D, H, K, top_k, cell=cell, input_heads=n_in, input_key_size=d_k,
                     input_value_size=d_v, comm_heads=n_c, comm_key_size=d_c, comm_value_size=d_cv,
                     input_dropout=input_dropout, comm_dropout=comm_dropout,
                     block_inactive_grad=block_inactive_grad)


#: ``tl.dot`` precision of float32 products when PyTorch's TF32 is off. Triton's "ieee" float32
#: dot runs on CUDA cores with the weight tile in registers: on an H100 at B=64, K=6, H=100 the
#: cell kernel took 0.70 ms per step with it and 0.075 ms with "tf32x3" (three TF32 tensor-core
#: products with error compensation, float32-level accuracy: the GPU tests pass float32
#: tolerances against the float64 reference, max |out error| 6e-7 at T=20).
FP32_DOT = "tf32x3"


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 products follow PyTorch's TF32 setting (SPEC "Dtypes"): TF32 when allowed, else
    :data:`FP32_DOT`; half-precision operands ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return FP32_DOT


# ------------------------------------------------------------------ forward (Triton)


def _forward(x: Tensor, h0: Tensor, c0: Optional[Tensor], P: Sequence[Tensor], cfg: RimConfig,
             drop_in: float, drop_c: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T, B, M, D = x.shape
    K, H = cfg.num_units, cfg.hidden_size
    NI, DK, DV = cfg.input_heads, cfg.input_key_size, cfg.input_value_size
    NC, DC, DCV = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
    lstm = cfg.cell == "lstm"
    G = cfg.gates
    dtype, dev = x.dtype, x.device
    ct = compute_dtype(dtype)
    rnd = _Rounder(dtype)
    p = dict(zip(PARAM_NAMES, (t.contiguous() for t in P)))
    x = x.contiguous()

    # State-independent work of all steps (PyTorch GEMMs, float32 accumulation).
    xc = x.to(ct)
    keys = rnd(xc @ p["input_key"].to(ct)).contiguous()  # (T, B, M, NI*DK)
    fold = rnd(torch.einsum("dnv,knvg->kndg", p["input_value"].to(ct).view(D, NI, DV),
                            p["weight_ih"].to(ct).view(K, NI, DV, G * H)))  # (K, NI, D, G*H)
    xw = torch.einsum("tbmd,kndg->tbknmg", xc, fold).contiguous()  # (T, B, K, NI, M, G*H)

    # Workspaces: float32 carried state (ping-pong for c), h~, communication Q/K/V.
    h = h0.to(torch.float32).contiguous().clone()
    c_a = (c0.to(torch.float32).contiguous().clone() if lstm else h.new_empty(0))
    c_b = torch.empty_like(c_a)
    ht = torch.empty(B, K, H, device=dev, dtype=torch.float32)
    qc = torch.empty(B, K, NC * DC, device=dev, dtype=torch.float32)
    kc = torch.empty_like(qc)
    vc = torch.empty(B, K, NC * DCV, device=dev, dtype=torch.float32)
    out = torch.empty(T, B, K * H, device=dev, dtype=dtype)
    masks = torch.empty(T, B, K, device=dev, dtype=torch.int8)
    prec = _dot_precision(dtype)
    seed_in, seed_c = seed, seed + 1
    for t in range(T):
        _k.rim_cell_fwd(h, c_a, keys, xw, p["input_query"], p["weight_hh"], p["bias_ih"],
                        p["bias_hh"], p["comm_query"], p["comm_key"], p["comm_value"], ht, c_b,
                        masks, qc, kc, vc, t=t, M=M, K=K, H=H, NI=NI, DK=DK, NC=NC, DC=DC,
                        DCV=DCV, top_k=cfg.top_k, lstm=lstm, seed=seed_in, p_drop=drop_in,
                        prec=prec)
        _k.rim_comm_fwd(ht, masks, qc, kc, vc, p["comm_output"], h, out, t=t, K=K, H=H, NC=NC,
                        DC=DC, DCV=DCV, seed=seed_c, p_drop=drop_c, prec=prec)
        if lstm:
            c_a, c_b = c_b, c_a
    h_n = h.to(dtype)
    c_n = c_a.to(dtype) if lstm else x.new_empty(0)
    return out, h_n, c_n, masks.bool()


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


# ------------------------------------------------------------------ the op


@torch.library.custom_op("rims_fast::rim_triton_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def rim_triton_fwd(x: Tensor, h0: Tensor, c0: Optional[Tensor], params: list[Tensor],
                   sizes: list[int], cell: str, input_dropout: float, comm_dropout: float,
                   block_inactive_grad: bool, training: bool, seed: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole sequence. ``c_n`` is an empty tensor for GRU (ops cannot return ``None``)."""
    cfg = _cfg_from(sizes, cell, input_dropout, comm_dropout, block_inactive_grad)
    drop_in = input_dropout if training else 0.0
    drop_c = comm_dropout if training else 0.0
    return _forward(x, h0, c0, params, cfg, drop_in, drop_c, seed)


@rim_triton_fwd.register_fake
def _(x, h0, c0, params, sizes, cell, input_dropout, comm_dropout, block_inactive_grad, training,
      seed):
    T, B, M, D = x.shape
    H, K = sizes[1], sizes[2]
    out = x.new_empty(T, B, K * H)
    h_n = x.new_empty(B, K, H)
    c_n = x.new_empty(B, K, H) if cell == "lstm" else x.new_empty(0)
    return out, h_n, c_n, x.new_empty(T, B, K, dtype=torch.bool)


def _setup_context(ctx, inputs, output):
    x, h0, c0, params, sizes, cell, input_dropout, comm_dropout, big, training, seed = inputs
    ctx.cfg = _cfg_from(sizes, cell, input_dropout, comm_dropout, big)
    ctx.training, ctx.seed = training, seed
    ctx.has_c0 = c0 is not None
    ctx.n_params = len(params)
    ctx.save_for_backward(x, h0, *([c0] if c0 is not None else []), *params, output[3])


def _backward(ctx, g_out, g_hn, g_cn, g_masks):
    saved = ctx.saved_tensors
    x, h0 = saved[0], saved[1]
    i = 2
    c0 = None
    if ctx.has_c0:
        c0, i = saved[2], 3
    params = list(saved[i:i + ctx.n_params])
    masks = saved[-1]
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
    return g_x, g_h0, g_c0, g_params, None, None, None, None, None, None, None


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
    out, h_n, c_n, masks = rim_triton_fwd(x, h0, c0 if cfg.cell == "lstm" else None, plist,
                                          sizes, cell, p_in, p_c, big, bool(training), seed)
    return out, h_n, (c_n if cfg.cell == "lstm" else None), masks
