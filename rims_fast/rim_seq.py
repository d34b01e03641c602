"""The persistent whole-sequence forward (``rims_fast::rim_seq_fwd``, CUDA C++) as a sequence op.

:func:`rim_seq` has :func:`rims_fast.reference.rim_ref`'s contract. What runs where:

- **Forward — one CUDA kernel launch for all T steps** (``csrc/kernels/rim_seq_fwd.cuh``): each
  thread block owns a tile of up to 8 samples for the whole sequence, keeps their ``h``/``c`` and
  every per-step activation in shared memory, and runs SPEC steps 1-5 as nine barrier-separated
  phases per step (queries; scores, null softmax and ``p``; the rank rule; the attention-weighted
  input; the gate products of the active rows; the masked cell; communication Q/K/V; the
  communication attention; output projection and residual). Samples never interact, so there is
  no grid synchronisation. Before it, PyTorch hoists the state-independent work: the input keys of
  all steps and either the fold ``input_value_n weight_ih[k]_n`` (when ``M*D <= d_v``, the
  reference's rule; the kernel reads ``x``) or the values of all steps (the kernel reads them and
  multiplies ``weight_ih`` in place).
- **Backward — recompute**: :func:`rim_ref` (with the fused CUDA masked cell on CUDA tensors)
  under the forward's masks and dropout keep-masks, differentiated by autograd.

Numerics: products accumulate in float32 (float64 for float64) from storage-dtype weights;
activations are not rounded to bfloat16/float16 between products (as the C++ CPU driver), so half
precision results differ from the reference's operand rounding within the tolerance table.
Dropout uses the C++ driver's counter-based stream, so the keep-masks equal ``backend="cpu"``'s
for the same seed (:func:`rims_fast.rim_cpu.dropout_masks`).

The op's CPU implementation runs the same tile function on the host (no threads, slow): it is how
the kernel's arithmetic is tested without a GPU. ``RIMS_FAST_CUDA_FWD=persistent`` makes
``backend="cuda"`` use this op; the default, ``cell``, keeps the reference loop with the fused
masked cell, because the persistent kernel has not run on a GPU yet.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from ._config import RimConfig, cfg_args, cfg_from
from .reference import compute_dtype, rim_ref

__all__ = ["rim_seq", "unavailable_reason", "cuda_fwd_mode", "tile_size", "PARAM_NAMES"]

PARAM_NAMES = ("input_key", "input_value", "input_query", "weight_ih", "weight_hh", "bias_ih",
               "bias_hh", "comm_query", "comm_key", "comm_value", "comm_output")
_OP = "rims_fast::rim_seq_fwd"


def tile_size() -> int:
    """``RIMS_FAST_CUDA_TILE``: samples per thread block of the persistent kernel, 1..8; 0 (the
    default) takes 8, fewer when shared memory is short. A tuning knob until a GPU run picks the
    default from measurements."""
    v = os.environ.get("RIMS_FAST_CUDA_TILE", "0")
    if not v.isdigit() or int(v) > 8:
        raise ValueError(f"RIMS_FAST_CUDA_TILE must be an integer in 0..8, got {v!r}")
    return int(v)


def cuda_fwd_mode() -> str:
    """``RIMS_FAST_CUDA_FWD``: ``"cell"`` (default) or ``"persistent"``."""
    mode = os.environ.get("RIMS_FAST_CUDA_FWD", "cell")
    if mode not in ("cell", "persistent"):
        raise ValueError(f"RIMS_FAST_CUDA_FWD must be 'cell' or 'persistent', got {mode!r}")
    return mode


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``None`` if the op runs on tensors of this device and dtype (CPU: float32/float64, the
    host run for tests; CUDA: all four float dtypes), else why not."""
    from . import masked_cell
    if not masked_cell.HAVE_C:
        return f"the extension rims_fast._C is not available: {masked_cell.C_IMPORT_ERROR}"
    device = torch.device(device)
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(_OP, key)
    except RuntimeError:
        ok = False
    if not ok:
        return f"rims_fast._C has no {key} kernel of {_OP} (rebuild it; CUDA needs a CUDA build)"
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        return "the host run of rim_seq_fwd takes float32 and float64"
    return None


def _hoisted(x: Tensor, p: Mapping[str, Tensor], cfg: RimConfig) -> tuple[Tensor, Tensor, Tensor, bool]:
    """``keys``, the input term's source ``xsrc``, its matrix ``w_x`` and whether ``xsrc`` holds
    per-head values (in the compute dtype)."""
    T, B, M, D = x.shape
    K, n, dv, GH = cfg.num_units, cfg.input_heads, cfg.input_value_size, cfg.gates * cfg.hidden_size
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    keys = xc @ p["input_key"].to(ct)
    w_ih = p["weight_ih"].to(ct).view(K, n, dv, GH)
    if M * D <= dv:  # fold input_value_n weight_ih[k]_n: (K, n, D, GH)
        w_x = torch.einsum("dnv,knvg->kndg", p["input_value"].to(ct).view(D, n, dv), w_ih)
        return keys.contiguous(), xc.contiguous(), w_x.contiguous(), False
    vals = xc @ p["input_value"].to(ct)
    return keys.contiguous(), vals.contiguous(), w_ih.contiguous(), True


def _register_fake() -> None:
    """Shapes of the C++ op for torch.compile / opcheck."""

    @torch.library.register_fake(_OP)
    def _(keys, xsrc, w_x, h0, c0, input_query, weight_hh, *rest):
        T, B = keys.shape[:2]
        K, H, GH = weight_hh.shape
        new = h0.new_empty
        return (new((T, B, K * H)), new((B, K, H)), new((B, K, H) if GH == 4 * H else (0,)),
                h0.new_empty((T, B, K), dtype=torch.bool))


if unavailable_reason(torch.device("cpu"), torch.float32) is None:
    _register_fake()


@torch.library.custom_op("rims_fast::rim_seq", mutates_args=(), device_types=("cuda", "cpu"))
def rim_seq_op(x: Tensor, h0: Tensor, c0: Optional[Tensor], params: list[Tensor],
               sizes: list[int], cell: str, input_dropout: float, comm_dropout: float,
               block_inactive_grad: bool, training: bool, seed: int, tile: int
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole sequence: ``out, h_n, c_n (empty for GRU), masks``."""
    cfg = cfg_from(sizes, cell, input_dropout, comm_dropout, block_inactive_grad)
    p = dict(zip(PARAM_NAMES, params))
    keys, xsrc, w_x, per_head = _hoisted(x, p, cfg)
    p_in = input_dropout if training else 0.0
    p_c = comm_dropout if training else 0.0
    out, h_n, c_n, masks = torch.ops.rims_fast.rim_seq_fwd(
        keys, xsrc, w_x, h0.contiguous(), c0.contiguous() if c0 is not None else None,
        p["input_query"], p["weight_hh"], p["bias_ih"], p["bias_hh"], p["comm_query"],
        p["comm_key"], p["comm_value"], p["comm_output"], cfg.top_k, cfg.input_heads,
        cfg.comm_heads, per_head, p_in, p_c, seed, tile)
    return out, h_n, c_n, masks


@rim_seq_op.register_fake
def _(x, h0, c0, params, sizes, cell, input_dropout, comm_dropout, block_inactive_grad, training,
      seed, tile):
    T, B = x.shape[:2]
    H, K = sizes[1], sizes[2]
    return (x.new_empty(T, B, K * H), x.new_empty(B, K, H),
            x.new_empty(B, K, H) if cell == "lstm" else x.new_empty(0),
            x.new_empty(T, B, K, dtype=torch.bool))


def _setup_context(ctx, inputs, output):
    x, h0, c0, params, sizes, cell, p_in, p_c, big, training, seed, tile = inputs
    ctx.cfg = cfg_from(sizes, cell, p_in, p_c, big)
    ctx.training, ctx.seed = training, seed
    ctx.has_c0 = c0 is not None
    ctx.n_params = len(params)
    ctx.mark_non_differentiable(output[3])
    ctx.save_for_backward(x, h0, *([c0] if c0 is not None else []), *params, output[3])


def _backward(ctx, g_out, g_hn, g_cn, _g_masks):
    saved = ctx.saved_tensors
    x, h0 = saved[0], saved[1]
    i = 3 if ctx.has_c0 else 2
    c0 = saved[2] if ctx.has_c0 else None
    params, masks = list(saved[i:i + ctx.n_params]), saved[-1]
    cfg = ctx.cfg
    lstm = cfg.cell == "lstm"
    hooks = {}
    if x.is_cuda:
        from .masked_cell import masked_gru_cell, masked_lstm_cell
        hooks = dict(lstm_cell=masked_lstm_cell, gru_cell=masked_gru_cell)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (x, h0, *([c0] if c0 is not None else []), *params)]
        named = dict(zip(PARAM_NAMES, leaves[-ctx.n_params:]))
        keep = None
        if ctx.training and (cfg.input_dropout > 0 or cfg.comm_dropout > 0):
            from .rim_cpu import dropout_masks
            T, B, M, _ = x.shape
            keep = tuple(m.to(x.device) for m in dropout_masks(ctx.seed, T, B, M, cfg))
        out, h_n, c_n, _ = rim_ref(leaves[0], leaves[1], leaves[2] if c0 is not None else None,
                                   named, cfg, masks=masks, training=keep is not None,
                                   dropout_masks=keep, **hooks)
        pairs = [(o, g) for o, g in ((out, g_out), (h_n, g_hn), (c_n if lstm else None, g_cn))
                 if o is not None and g is not None]
        res = torch.autograd.grad([o for o, _ in pairs], leaves, [g.contiguous() for _, g in pairs],
                                  allow_unused=True)
    res = [torch.zeros_like(l) if r is None else r for r, l in zip(res, leaves)]
    g_c0 = res[2] if c0 is not None else None
    return (res[0], res[1], g_c0, list(res[-ctx.n_params:]), None, None, None, None, None, None,
            None, None)


rim_seq_op.register_autograd(_backward, setup_context=_setup_context)


def rim_seq(x: Tensor, h0: Tensor, c0: Optional[Tensor], params: Mapping[str, Tensor],
            cfg: RimConfig, *, training: bool = False, seed: Optional[int] = None,
            tile: Optional[int] = None) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """One RIM layer over a sequence with the persistent kernel; :func:`rim_ref`'s contract.
    ``seed``: the dropout seed (``None``: drawn from PyTorch's generator when dropout is on);
    ``tile``: samples per thread block, 1..8 (0: 8, fewer when shared memory is short; None:
    :func:`tile_size`)."""
    if tile is None:
        tile = tile_size()
    why = unavailable_reason(x.device, x.dtype)
    if why is not None:
        raise RuntimeError(why)
    sizes, cell, p_in, p_c, big = cfg_args(cfg)
    dropping = training and (p_in > 0 or p_c > 0)
    if seed is None:
        from .rim_cpu import draw_seed
        seed = draw_seed() if dropping else 0
    lstm = cfg.cell == "lstm"
    out, h_n, c_n, masks = rim_seq_op(x, h0, c0 if lstm else None,
                                      [params[n] for n in PARAM_NAMES], sizes, cell, p_in, p_c,
                                      big, bool(training), seed, tile)
    return out, h_n, (c_n if lstm else None), masks
