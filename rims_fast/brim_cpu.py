"""``BRIM(backend="cpu")``: a BRIM stack on the C++ driver, one fused layer-step per call of its
pre-projected mode (``rims_fast::rim_cpu_kv_fwd`` / ``_bwd``, ``T = 1``). The loop, the dtype and
dropout rules are :mod:`rims_fast.brim_steps`'; :func:`brim_cpu` has
:func:`rims_fast.reference.brim_ref`'s contract.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from torch import Tensor

from . import rim_cpu
from ._config import RimConfig
from .brim_steps import brim_steps, dropout_masks, num_elements, step_seed

__all__ = ["brim_cpu", "unavailable_reason", "step_seed", "dropout_masks", "num_elements"]

unavailable_reason = rim_cpu.unavailable_reason


def _step(keys, values, h, c, params, cfg, training, seed):
    return rim_cpu.rim_cpu_kv(keys, values, h, c, params, cfg, training=training, seed=seed)


def brim_cpu(x: Tensor, states: Sequence[tuple[Tensor, Optional[Tensor]]],
             layer_params: Sequence[Mapping[str, Tensor]], cfgs: Sequence[RimConfig], *,
             training: bool = False, seed: Optional[int] = None,
             ) -> tuple[list[Tensor], list[tuple[Tensor, Optional[Tensor]]], list[Tensor]]:
    """A BRIM stack over a sequence on the C++ driver; see :func:`brim_steps` for the arguments."""
    why = unavailable_reason(x.device, x.dtype)
    if why is not None:
        raise RuntimeError(why)
    return brim_steps(x, states, layer_params, cfgs, _step, training=training, seed=seed)
