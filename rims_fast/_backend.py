"""Which backends exist here, and why not; resolution of ``backend=`` to the one that runs.

Each backend is a function with :func:`rims_fast.reference.rim_ref`'s signature (minus the
reference-only ``masks=``/cell hooks), returning ``(out, h_n, c_n, masks)``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from typing import Callable, Optional

import torch

from ._config import BACKENDS
from .reference import rim_ref

log = logging.getLogger("rims_fast")

#: ``TRITON_INTERPRET=1`` at ``import rims_fast``. Triton reads the variable when it is imported,
#: which ``import rims_fast`` did (through ``torch._dynamo``) until Triton became a first-use
#: import; the rule stays "set it before ``import rims_fast``", so that whether
#: ``backend="triton"`` runs on CPU tensors does not depend on when it is first used.
TRITON_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


def assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` without its import of ``torch._dynamo`` (most of
    the time of ``import rims_fast``, and it imports Triton): the decorator only sets this mark,
    which Dynamo reads when it traces a call (tests/test_compile.py checks that it still is)."""
    fn._dynamo_marked_constant = True
    return fn


#: ``backend="auto"`` tries these in order for the tensors' device type (RIM, RIMCell). On CUDA,
#: ``cuda`` (RIMS_FAST_CUDA_FWD=auto: persistent kernels or stepped ops) comes first: on an H100
#: in bf16 it trained 14x faster than ``triton`` at `paper` (22.6 against 327 ms fwd+bwd; Triton's
#: backward is a recompute through the reference) and 7x at `large` (274 against 1958 ms;
#: benchmarks/results/nvidia-h100-*bfloat16-2026-11-27a.json); its eager forward at `paper` took
#: 7.3 ms, Triton's 11.0 in an earlier run (nvidia-h100-bfloat16-2026-11-26d.json).
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
#: The same for BRIM stacks (the Triton stack's backward is a recompute too).
BRIM_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_AUTO_ORDERS = {"RIM": AUTO_ORDER, "BRIM": BRIM_AUTO_ORDER}


def _torch(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return None


def _cuda(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda":
        return f"backend='cuda' needs CUDA tensors, got device {device}"
    from . import masked_cell
    if not masked_cell.HAVE_C:
        return f"the CUDA extension rims_fast._C is not available: {masked_cell.C_IMPORT_ERROR}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("rims_fast::masked_lstm_cell_fwd", "CUDA"):
        return "rims_fast._C was built without CUDA kernels (CPU-only build)"
    return None


def _triton(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    try:
        mod = importlib.import_module("rims_fast.rim_triton")
    except ImportError as e:  # triton missing, or the kernels failed to import
        return f"Triton backend unavailable: {e}"
    return mod.unavailable_reason(device, dtype)


def _cpu(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    from . import rim_cpu  # the C++ sequence driver; importing it never fails without _C
    return rim_cpu.unavailable_reason(device, dtype)


_CHECKS: dict[str, Callable[[torch.device, torch.dtype], Optional[str]]] = {
    "torch": _torch, "cuda": _cuda, "triton": _triton, "cpu": _cpu,
}


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``None`` if backend ``name`` can run on tensors of this device and dtype, else why not."""
    device = torch.device(device)
    # The per-backend checks look at the build only; without a GPU no backend runs on CUDA.
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    return _CHECKS[name](device, dtype)


# torch.compile evaluates this at trace time and bakes the answer into the graph (it depends only
# on the build and the tensors' device and dtype, which the graph's guards already pin).
@assume_constant_result
def resolve(requested: str, device: torch.device, dtype: torch.dtype, module: str = "RIM") -> str:
    """The backend that will run. An explicit backend that cannot run raises ``RuntimeError``.
    ``module`` (``"RIM"`` or ``"BRIM"``) picks the ``"auto"`` order."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        why = unavailable_reason(requested, device, dtype)
        if why is not None:
            raise RuntimeError(why)
        return requested
    return _resolve_auto(torch.device(device).type, dtype, module)


@functools.lru_cache(maxsize=None)
def _resolve_auto(device_type: str, dtype: torch.dtype, module: str = "RIM") -> str:
    reasons = []
    for name in _AUTO_ORDERS[module].get(device_type, ("torch",)):
        why = unavailable_reason(name, torch.device(device_type), dtype)
        if why is None:
            # Say once per (module, device, dtype) what "auto" chose and what it passed over.
            log.info("rims_fast: %sbackend='auto' runs %r on %s/%s%s",
                     "" if module == "RIM" else f"{module} ", name, device_type, dtype,
                     "".join(f"; skipped {r}" for r in reasons))
            return name
        reasons.append(why)
    raise AssertionError("the torch backend is always available")


def no_autocast(device_type: str):
    """A context that turns an active ``torch.autocast`` off for ``device_type`` (else a no-op).
    The modules run their backends inside it: SPEC.md's dtype contract (input, state, parameters
    and output share one dtype; products accumulate in float32 from operands rounded to that
    dtype) is what every backend computes, so a float32 layer stays float32 under autocast, as a
    custom op autocast does not list. Without it the reference's products would drop to the
    autocast dtype and the fused backends' PyTorch glue would hand their ops mixed dtypes."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def runner(name: str) -> Callable:
    """The sequence function of backend ``name``."""
    if name == "torch":
        return rim_ref
    if name == "cuda":
        from .rim_seq import cuda_fwd_mode, rim_seq
        if cuda_fwd_mode() != "cell":  # RIMS_FAST_CUDA_FWD=auto|persistent|stepped (rim_seq)
            return rim_seq
        from .masked_cell import masked_gru_cell, masked_lstm_cell
        return functools.partial(rim_ref, lstm_cell=masked_lstm_cell, gru_cell=masked_gru_cell)
    if name == "triton":
        from .rim_triton import rim_triton
        return rim_triton
    if name == "cpu":
        from .rim_cpu import rim_cpu
        return rim_cpu
    raise ValueError(f"unknown backend {name!r}")


def tf32_matmul() -> bool:
    """Whether PyTorch's float32 CUDA matmuls may use TF32 (SPEC "Dtypes": float32 products follow
    this setting). Read through ``torch.backends.cuda.matmul.fp32_precision``, which answers after
    either API set it: reading the legacy ``allow_tf32`` raises once the new API was used."""
    m = torch.backends.cuda.matmul
    prec = getattr(m, "fp32_precision", None)
    return prec == "tf32" if prec is not None else bool(m.allow_tf32)


def triton_interpreter() -> bool:
    """Whether Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
