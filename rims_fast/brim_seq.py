"""A BRIM stack on the persistent CUDA kernels (``rims_fast::rim_seq_fwd`` / ``rim_seq_bwd``), one
kernel launch per layer-step in their pre-projected mode (``T = 1``, per-head values, ``weight_ih``
in place), or on the stepped ops (``rim_steps_fwd`` / ``rim_steps_bwd``: four GEMMs and four small
kernels per layer-step), per layer as :func:`rims_fast.rim_seq.use_stepped` picks.
``BRIM(backend="cuda")`` runs it unless ``RIMS_FAST_CUDA_FWD=cell``. The loop,
dtype and dropout rules are :mod:`rims_fast.brim_steps`' (the kernels use the C++ driver's dropout
stream, so the keep-masks equal ``backend="cpu"``'s); :func:`brim_seq` has
:func:`rims_fast.reference.brim_ref`'s contract. On CPU tensors (float32/float64) the kernels'
host runs execute it, which is how it is tested without a GPU.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from ._config import RimConfig, cfg_args
from .brim_steps import brim_steps
from .rim_seq import (OP_WEIGHTS, cluster_mechs, cuda_fwd_mode, mma_mode, resident_mode,
                      rim_seq_op, stepped_instead, tile_size, unavailable_reason, use_stepped,
                      xw_mode)

__all__ = ["brim_seq", "unavailable_reason"]


def _step(keys, values, h, c, params, cfg, training, seed, stepped=None):
    sizes, cell, p_in, p_c, big = cfg_args(cfg)
    if not training:
        p_in = p_c = 0.0
    K, n, dv, GH = cfg.num_units, cfg.input_heads, cfg.input_value_size, cfg.gates * cfg.hidden_size
    w_x = params["weight_ih"].view(K, n, dv, GH)
    if stepped is None:  # per layer (per-head values: the input term is weight_ih, n * dv rows)
        auto = cuda_fwd_mode() == "auto"
        stepped = use_stepped(cfg, n * dv)
        try:
            return _step(keys, values, h, c, params, cfg, training, seed, stepped)
        except RuntimeError as e:
            if not (auto and not stepped and stepped_instead(e, cfg)):
                raise
        return _step(keys, values, h, c, params, cfg, training, seed, True)
    weights = [params[name] for name in OP_WEIGHTS]
    lstm = cfg.cell == "lstm"
    leaves = (keys, values, w_x, h, c, *weights)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)
    mma = not stepped and mma_mode(h.device, h.dtype)
    cluster, resident = (0, 0) if stepped else (cluster_mechs(h.device, K, mma), resident_mode())
    res = rim_seq_op(keys.contiguous(), values.contiguous(), w_x.contiguous(), h.contiguous(),
                     c.contiguous() if lstm else None, weights, sizes, cell, p_in, p_c, big, True,
                     seed, 0 if stepped else tile_size(), save, mma, cluster, resident,
                     0 if stepped else xw_mode(mma), stepped)
    return res[0], res[1], (res[2] if lstm else None), res[3]


def brim_seq(x: Tensor, states: Sequence[tuple[Tensor, Optional[Tensor]]],
             layer_params: Sequence[Mapping[str, Tensor]], cfgs: Sequence[RimConfig], *,
             training: bool = False, seed: Optional[int] = None,
             stepped: Optional[bool] = None,
             ) -> tuple[list[Tensor], list[tuple[Tensor, Optional[Tensor]]], list[Tensor]]:
    """A BRIM stack over a sequence on the persistent kernels, or with ``stepped`` on the stepped
    ops (None: per layer, :func:`rims_fast.rim_seq.use_stepped`); see :func:`rims_fast.brim_steps.brim_steps` for
    the other arguments."""
    why = unavailable_reason(x.device, x.dtype)
    if why is not None:
        raise RuntimeError(why)
    return brim_steps(x, states, layer_params, cfgs, functools.partial(_step, stepped=stepped),
                      training=training, seed=seed)
