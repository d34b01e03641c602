"""rims_fast: exact and fast Recurrent Independent Mechanisms (RIMs) for PyTorch.

Public API: :class:`RIM`, :class:`RIMCell`, :class:`BRIM` (``torch.nn`` drop-ins), :func:`rim_ref`
and :func:`brim_ref` (the pure PyTorch references every backend is tested against), :class:`RimConfig`, and
:func:`available_backends`. ``python -m rims_fast.info`` reports versions, build and backends.
"""

from ._config import BACKENDS, RimConfig
from .brim import BRIM
from .modules import RIM, RIMCell
from .reference import brim_ref, rim_ref

__version__ = "0.1.0"


def available_backends(device="cpu", dtype=None) -> dict:
    """``{backend: None if it can run here, else the reason it cannot}`` for tensors of this
    device and dtype (default float32)."""
    import torch

    from ._backend import unavailable_reason
    dtype = dtype or torch.float32
    return {name: unavailable_reason(name, torch.device(device), dtype) for name in BACKENDS[1:]}


__all__ = ["RIM", "RIMCell", "BRIM", "brim_ref", "RimConfig", "rim_ref", "available_backends", "BACKENDS", "__version__"]
