"""``BRIM(backend="triton")``: a BRIM stack on the Triton RIM step kernels, one layer-step at a
time (SPEC "Multi-layer: BRIM"; :func:`rims_fast.reference.brim_ref` is the contract).

What runs where:

- **Forward — the RIM kernels** of :mod:`rims_fast.rim_triton` (``_rim_cell_fwd_kernel``,
  ``_rim_comm_fwd_kernel``), two launches per layer-step, the state carried in float32 buffers
  per layer. Layer ``l`` at step ``t`` reads layer ``l-1``'s ``h_t`` and layer ``l+1``'s
  ``h_{t-1}``, so layers interleave step by step; before each layer-step PyTorch computes its
  sources' keys and the input term per element ``XW[b, k, n, m] = v_{m,n} weight_ih[k]_n`` (the
  kernels' folded-input layout) from the values ``v = source input_value_*``. Layer 0's bottom-up
  keys and values come from ``x`` for all steps at once. No host sync inside the loop.
- **Backward — recompute** through :func:`brim_ref` under the forward's masks and dropout draw,
  as ``rim_triton``'s default backward (no backward kernels for stacks yet).

Dropout: one seed per call; layer-step ``(t, l)`` draws from the Triton stream with
:func:`step_seed`, so :func:`dropout_masks` rebuilds every keep-mask (the recompute uses it).

Limits: the per-layer-step ``XW`` product costs ``B M_l K n_in d_v G H`` multiply-adds (a
``(B M_l, d_v) x (d_v, G H)`` GEMM per mechanism and head), ``M_l`` times the unfolded
``u weight_ih`` product; the stack is a ``torch.autograd.Function`` (not a custom op), so
``torch.compile`` breaks the graph around it.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import rim_triton as rt
from ._config import RimConfig
from .brim_steps import num_elements
from .reference import _Rounder, brim_ref, compute_dtype

__all__ = ["brim_triton", "unavailable_reason", "step_seed", "dropout_masks"]

unavailable_reason = rt.unavailable_reason


def step_seed(base: int, t: int, layer: int, num_layers: int) -> int:
    """The Triton dropout seed (< 2^31 - 1) of layer-step ``(t, layer)`` of a call drawn ``base``."""
    from .brim_steps import step_seed as mix
    return mix(base, t, layer, num_layers) % (2 ** 31 - 1)


def dropout_masks(base: int, T: int, B: int, M: int, cfgs: Sequence[RimConfig], device,
                  training: bool = True) -> list[Optional[tuple]]:
    """Per layer, the keep-masks ``(T, B, K, n_in, M_l)`` / ``(T, B, K, n_c, K)`` (``None`` where
    that dropout is off) the forward used with seed ``base``; :func:`brim_ref`'s layout."""
    L = len(cfgs)
    res = []
    for l, (cfg, m_l) in enumerate(zip(cfgs, num_elements(cfgs, M))):
        K = cfg.num_units
        pair = []
        for p, shape, off in ((cfg.input_dropout, (1, B, K, cfg.input_heads, m_l), 0),
                              (cfg.comm_dropout, (1, B, K, cfg.comm_heads, K), 1)):
            if not training or p == 0:
                pair.append(None)
                continue
            pair.append(torch.cat([rt._k.rim_dropout_masks(shape, step_seed(base, t, l, L) + off,
                                                           p, device) for t in range(T)]))
        res.append(tuple(pair))
    return res


def _forward(x: Tensor, states: Sequence[tuple[Tensor, Optional[Tensor]]],
             P: Sequence[Mapping[str, Tensor]], cfgs: Sequence[RimConfig], training: bool,
             seed: int) -> tuple[list[Tensor], list[Tensor], list[Optional[Tensor]], list[Tensor]]:
    """Kernels only (no autograd): per-layer ``out (T, B, K*H)``, ``h_n``, ``c_n``, ``masks``."""
    T, B, M, _ = x.shape
    L = len(cfgs)
    dtype, dev = x.dtype, x.device
    ct = compute_dtype(dtype)
    rnd = _Rounder(dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    prec = rt._dot_precision(dtype)
    P = [{n: p.contiguous() for n, p in lp.items()} for lp in P]
    Pc = [{n: p.to(ct) for n, p in lp.items()} for lp in P]
    xc = x.to(ct)
    keys0 = rnd(xc @ Pc[0]["input_key_bottom_up"])  # (T, B, M, n_in*d_k)
    vals0 = rnd(xc @ Pc[0]["input_value_bottom_up"])
    h = [s[0].to(torch.float32).contiguous().clone() for s in states]
    c = [s[1].to(torch.float32).contiguous().clone() if s[1] is not None else None for s in states]
    c_next = [torch.empty_like(ci) if ci is not None else None for ci in c]
    outs = [torch.empty(T, B, cfg.num_units * cfg.hidden_size, device=dev, dtype=dtype)
            for cfg in cfgs]
    masks = [torch.empty(T, B, cfg.num_units, device=dev, dtype=torch.int8) for cfg in cfgs]
    work = [dict(ht=torch.empty(B, cfg.num_units, cfg.hidden_size, **f32),
                 qc=torch.empty(B, cfg.num_units, cfg.comm_heads * cfg.comm_key_size, **f32),
                 kc=torch.empty(B, cfg.num_units, cfg.comm_heads * cfg.comm_key_size, **f32),
                 vc=torch.empty(B, cfg.num_units, cfg.comm_heads * cfg.comm_value_size, **f32))
            for cfg in cfgs]

    def flat(state: Tensor) -> Tensor:  # (B, K, H) float32 -> one element (B, 1, K*H), rounded
        return rnd(state.to(ct).reshape(B, 1, -1))

    for t in range(T):
        for l, cfg in enumerate(cfgs):
            K, H, NI, DV = cfg.num_units, cfg.hidden_size, cfg.input_heads, cfg.input_value_size
            if l == 0:
                keys, vals = [keys0[t]], [vals0[t]]
            else:
                below = flat(h[l - 1])  # already updated at step t
                keys = [rnd(below @ Pc[l]["input_key_bottom_up"])]
                vals = [rnd(below @ Pc[l]["input_value_bottom_up"])]
            if l < L - 1:
                above = flat(h[l + 1])  # not yet updated at step t: h_{t-1}
                keys.append(rnd(above @ Pc[l]["input_key_top_down"]))
                vals.append(rnd(above @ Pc[l]["input_value_top_down"]))
            m_l = sum(k.shape[1] for k in keys)
            k_t = torch.cat(keys, 1).to(torch.float32).unsqueeze(0).contiguous()
            v_t = torch.cat(vals, 1).view(B, m_l, NI, DV)
            w_ih = rnd(Pc[l]["weight_ih"]).view(K, NI, DV, cfg.gates * H)
            xw = torch.einsum("bmnv,knvg->bknmg", v_t, w_ih).to(torch.float32).unsqueeze(0)
            xw = xw.contiguous()  # (1, B, K, NI, M_l, G*H)
            s = step_seed(seed, t, l, L)
            p_in = cfg.input_dropout if training else 0.0
            p_c = cfg.comm_dropout if training else 0.0
            w, p = work[l], P[l]
            lstm = cfg.cell == "lstm"
            c_out = c_next[l] if lstm else h[l]
            m_t, o_t = masks[l][t:t + 1], outs[l][t:t + 1]  # slot t, seen by the kernels as 0
            rt._k.rim_cell_fwd(h[l], c[l] if lstm else h[l], k_t, xw, p["input_query"],
                               p["weight_hh"], p["bias_ih"], p["bias_hh"], p["comm_query"],
                               p["comm_key"], p["comm_value"], w["ht"], c_out, m_t, w["qc"],
                               w["kc"], w["vc"], t=0, M=m_l, K=K, H=H, NI=NI,
                               DK=cfg.input_key_size, NC=cfg.comm_heads, DC=cfg.comm_key_size,
                               DCV=cfg.comm_value_size, top_k=cfg.top_k, lstm=lstm, seed=s,
                               p_drop=p_in, prec=prec)
            rt._k.rim_comm_fwd(w["ht"], m_t, w["qc"], w["kc"], w["vc"], p["comm_output"], h[l],
                               o_t, t=0, K=K, H=H, NC=cfg.comm_heads, DC=cfg.comm_key_size,
                               DCV=cfg.comm_value_size, seed=s + 1, p_drop=p_c, prec=prec)
            if lstm:
                c[l], c_next[l] = c_next[l], c[l]
    return (outs, [hl.to(dtype) for hl in h], [cl.to(dtype) if cl is not None else None for cl in c],
            [m.bool() for m in masks])


class _BrimTritonFn(torch.autograd.Function):
    """Forward: :func:`_forward`; backward: :func:`brim_ref` recomputed under the forward's masks
    and dropout draw. Inputs: ``x``, then per layer ``h0`` (and ``c0`` for LSTM), then every
    layer's parameters in ``names`` order."""

    @staticmethod
    def forward(ctx, meta, x, *flat):
        cfgs, names, training, seed = meta
        L, lstm = len(cfgs), cfgs[0].cell == "lstm"
        ns = 2 if lstm else 1
        states = [(flat[ns * l], flat[ns * l + 1] if lstm else None) for l in range(L)]
        params, i = [], ns * L
        for l in range(L):
            params.append(dict(zip(names[l], flat[i:i + len(names[l])])))
            i += len(names[l])
        with rt._on_device(x):
            outs, h_n, c_n, masks = _forward(x, states, params, cfgs, training, seed)
        ctx.meta = meta
        ctx.save_for_backward(x, *flat, *masks)
        ctx.mark_non_differentiable(*masks)
        return (*outs, *h_n, *[cl for cl in c_n if cl is not None], *masks)

    @staticmethod
    def backward(ctx, *grads):
        cfgs, names, training, seed = ctx.meta
        L, lstm = len(cfgs), cfgs[0].cell == "lstm"
        ns = 2 if lstm else 1
        saved = ctx.saved_tensors
        x, flat, masks = saved[0], saved[1:-L], saved[-L:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (x, *flat)]
            xs, fl = leaves[0], leaves[1:]
            states = [(fl[ns * l], fl[ns * l + 1] if lstm else None) for l in range(L)]
            params, i = [], ns * L
            for l in range(L):
                params.append(dict(zip(names[l], fl[i:i + len(names[l])])))
                i += len(names[l])
            keep = None
            if training and any(c.input_dropout > 0 or c.comm_dropout > 0 for c in cfgs):
                T, B, M, _ = x.shape
                keep = dropout_masks(seed, T, B, M, cfgs, x.device)
            outs, final, _ = brim_ref(xs, states, params, cfgs, masks=list(masks),
                                      training=keep is not None, dropout_masks=keep)
            results = list(outs) + [f[0] for f in final] + ([f[1] for f in final] if lstm else [])
            pairs = [(r, g) for r, g in zip(results, grads[:len(results)]) if g is not None]
            got = torch.autograd.grad([r for r, _ in pairs], leaves,
                                      [g.contiguous() for _, g in pairs], allow_unused=True)
        got = [torch.zeros_like(l) if g is None else g for g, l in zip(got, leaves)]
        return (None, *got)


def brim_triton(x: Tensor, states: Sequence[tuple[Tensor, Optional[Tensor]]],
                layer_params: Sequence[Mapping[str, Tensor]], cfgs: Sequence[RimConfig], *,
                training: bool = False, seed: Optional[int] = None,
                ) -> tuple[list[Tensor], list[tuple[Tensor, Optional[Tensor]]], list[Tensor]]:
    """A BRIM stack over a sequence with the Triton kernels; :func:`brim_ref`'s contract (without
    the reference-only ``masks=``/cell hooks). ``seed``: the dropout seed (``None`` draws one from
    PyTorch's CPU generator when dropout is on)."""
    why = unavailable_reason(x.device, x.dtype)
    if why is not None:
        raise RuntimeError(why)
    L, lstm = len(cfgs), cfgs[0].cell == "lstm"
    dropping = training and any(c.input_dropout > 0 or c.comm_dropout > 0 for c in cfgs)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 2, (1,)).item()) if dropping else 0
    names = tuple(tuple(lp.keys()) for lp in layer_params)
    flat = [t for s in states for t in ((s[0], s[1]) if lstm else (s[0],))]
    flat += [p for lp in layer_params for p in lp.values()]
    res = _BrimTritonFn.apply((tuple(cfgs), names, bool(training), seed), x, *flat)
    outs, h_n = list(res[:L]), list(res[L:2 * L])
    c_n = list(res[2 * L:3 * L]) if lstm else [None] * L
    masks = list(res[-L:])
    return outs, list(zip(h_n, c_n)), masks
