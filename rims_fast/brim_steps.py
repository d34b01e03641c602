"""A BRIM stack one fused layer-step per op call: the loop shared by ``BRIM(backend="cpu")``
(:mod:`rims_fast.brim_cpu`, the C++ driver) and the persistent CUDA kernels
(:mod:`rims_fast.brim_seq`). :func:`brim_steps` has :func:`rims_fast.reference.brim_ref`'s
contract given a ``step`` function.

Why per layer-step: layer ``l`` at step ``t`` reads layer ``l-1``'s ``h_t`` (this step) and
layer ``l+1``'s ``h_{t-1}``, so no layer can run ahead of the others and a whole-sequence call per
layer is impossible. Each layer-step is one call of a fused RIM step in its pre-projected mode
(``T = 1``; keys and values given): the competition, the gate products of the active rows, the
cell, the communication and the residual are fused, exactly as in a RIM step, and its backward is
the op's backward. Around it, per layer-step, PyTorch computes the sources' keys and values (one
or two small GEMMs: ``source input_key_*``, ``source input_value_*``); layer 0's bottom-up keys and
values come from ``x`` for all steps at once.

Why pre-projected and not folded (RIM's ``input_value W_ih`` fold): a BRIM source is one element
``K' H'`` wide, so the fold would be a ``(K' H') x (G H)`` matrix per mechanism and head, built per
call (~1.2 GFLOP per layer-step at paper size); projecting the values (``K' H' x n d_v``, once per
source) and multiplying ``sum_m a~ v_m`` by ``weight_ih[k]`` in place costs ~10x less.

dtypes: float32/float64 as they are; bfloat16/float16 compute in float32 (inputs, states and
parameters converted once; the state carried in float32 between steps; outputs rounded back).

Dropout: one seed per call from PyTorch's generator; layer-step ``(t, l)`` uses :func:`step_seed`
of it in the C++ driver's counter-based stream (the persistent kernels share that stream), so
:func:`dropout_masks` rebuilds every keep-mask for the reference.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import rim_cpu
from ._config import RimConfig
from .reference import compute_dtype

__all__ = ["brim_steps", "step_seed", "num_elements", "dropout_masks", "StepFn"]

#: ``step(keys (1, B, M_l, nk), values (1, B, M_l, nv), h, c, params, cfg, training, seed)`` ->
#: ``(out (1, B, K*H), h_n, c_n or None, masks (1, B, K))``, differentiable.
StepFn = Callable[..., tuple]

_MASK62 = (1 << 62) - 1


def step_seed(base: int, t: int, layer: int, num_layers: int) -> int:
    """The dropout seed of layer-step ``(t, layer)`` of a call drawn ``base`` (splitmix64)."""
    z = (base + (t * num_layers + layer + 1) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK62


def num_elements(cfgs: Sequence[RimConfig], M: int) -> list[int]:
    """Input elements per layer: bottom-up (``M`` for layer 0, 1 above) plus the top-down one."""
    L = len(cfgs)
    return [(M if l == 0 else 1) + (1 if l < L - 1 else 0) for l in range(L)]


def dropout_masks(base: int, T: int, B: int, M: int, cfgs: Sequence[RimConfig],
                  training: bool = True) -> list[tuple[Tensor, Tensor]]:
    """The keep-masks :func:`brim_steps` used with seed ``base``, in
    :func:`rims_fast.reference.brim_ref`'s ``dropout_masks`` layout (per layer)."""
    L = len(cfgs)
    res = []
    for l, (cfg, m_l) in enumerate(zip(cfgs, num_elements(cfgs, M))):
        steps = [rim_cpu.dropout_masks(step_seed(base, t, l, L), 1, B, m_l, cfg, training)
                 for t in range(T)]
        res.append((torch.cat([s[0] for s in steps]), torch.cat([s[1] for s in steps])))
    return res


def brim_steps(x: Tensor, states: Sequence[tuple[Tensor, Optional[Tensor]]],
               layer_params: Sequence[Mapping[str, Tensor]], cfgs: Sequence[RimConfig],
               step: StepFn, *, training: bool = False, seed: Optional[int] = None,
               ) -> tuple[list[Tensor], list[tuple[Tensor, Optional[Tensor]]], list[Tensor]]:
    """A BRIM stack over a sequence, one ``step`` call per layer-step.

    Args:
        x: ``(T, B, M, D)``.
        states: per layer ``(h0, c0)``, ``(B, K_l, H_l)`` (``c0`` None for GRU).
        layer_params: per layer, the BRIM layer's parameters by name.
        cfgs: per layer :class:`RimConfig`.
        step: the fused layer-step (:data:`StepFn`).
        training: dropout only when true (and its probability > 0).
        seed: the dropout seed of the call; ``None`` draws one from PyTorch's generator when
            dropout is on.

    Returns:
        per-layer outputs ``(T, B, K_l*H_l)``, final ``(h_n, c_n)`` and masks ``(T, B, K_l)``.
    """
    T, B, M, _ = x.shape
    L = len(cfgs)
    dtype, ct = x.dtype, compute_dtype(x.dtype)
    up = (lambda t: t.to(ct)) if ct != dtype else (lambda t: t)
    P = [{n: up(p) for n, p in lp.items()} for lp in layer_params]
    xc = up(x)
    dropping = training and any(c.input_dropout > 0 or c.comm_dropout > 0 for c in cfgs)
    if dropping and seed is None:
        seed = rim_cpu.draw_seed()
    # Layer 0's bottom-up source does not depend on the state: all steps at once.
    keys0 = (xc @ P[0]["input_key_bottom_up"]).unbind(0)
    vals0 = (xc @ P[0]["input_value_bottom_up"]).unbind(0)
    h = [up(s[0]) for s in states]
    c = [up(s[1]) if s[1] is not None else None for s in states]
    outs: list[list[Tensor]] = [[] for _ in range(L)]
    selected: list[list[Tensor]] = [[] for _ in range(L)]

    def flat(state: Tensor) -> Tensor:  # (B, K, H) -> one element (B, 1, K*H), mechanism-major
        return state.reshape(B, 1, -1)

    for t in range(T):
        h_prev = list(h)  # every layer's h_{t-1}, before this step updates any of them
        for l, cfg in enumerate(cfgs):
            if l == 0:
                keys, vals = [keys0[t]], [vals0[t]]
            else:
                below = flat(h[l - 1])
                keys = [below @ P[l]["input_key_bottom_up"]]
                vals = [below @ P[l]["input_value_bottom_up"]]
            if l < L - 1:
                above = flat(h_prev[l + 1])
                keys.append(above @ P[l]["input_key_top_down"])
                vals.append(above @ P[l]["input_value_top_down"])
            k_t = torch.cat(keys, 1).unsqueeze(0)  # (1, B, M_l, n_in*d_k)
            v_t = torch.cat(vals, 1).unsqueeze(0)
            s = step_seed(seed, t, l, L) if dropping else 0
            out, h[l], c[l], mask = step(k_t, v_t, h[l], c[l], P[l], cfg, training, s)
            outs[l].append(out[0])
            selected[l].append(mask[0])

    res_out = [torch.stack(o).to(dtype) for o in outs]
    final = [(h[l].to(dtype), c[l].to(dtype) if c[l] is not None else None) for l in range(L)]
    return res_out, final, [torch.stack(m) for m in selected]
