"""The masked recurrent cell update of a RIM step (SPEC.md step 3), as fused C++/CUDA ops.

Active mechanisms (``mask`` true) run an ``nn.LSTMCell`` / ``nn.GRUCell`` pointwise update from
precomputed gate pre-activations; inactive ones copy their state bit-exactly. Shapes: ``B``
batch, ``K`` mechanisms, ``H`` hidden per mechanism; gate blocks in PyTorch order, LSTM
``(i, f, g, o)``, GRU ``(r, z, n)``.

- :func:`masked_lstm_cell` / :func:`masked_gru_cell` call the ops ``torch.ops.rims_fast.*`` of
  the compiled extension ``rims_fast._C`` (CPU and, when built with CUDA, GPU kernels), with fake
  impls for ``torch.compile`` and autograd formulas registered here.
- :func:`masked_lstm_cell_ref` / :func:`masked_gru_cell_ref` are the pure PyTorch references with
  the same signatures and return values.

A missing or broken ``_C`` never breaks the import: ``HAVE_C`` says whether the ops exist and
``C_IMPORT_ERROR`` why not.
"""

from __future__ import annotations

import warnings

import torch

from .reference import gru_cell_ref, lstm_cell_ref

__all__ = ["HAVE_C", "C_IMPORT_ERROR", "BUILD_INFO", "masked_lstm_cell", "masked_gru_cell",
           "masked_lstm_cell_ref", "masked_gru_cell_ref"]


def _version_clash_message() -> str:
    """'built for torch X / CUDA Y, you have torch Z / CUDA W', from setup.py's metadata."""
    try:
        from . import _build_info as b
    except ImportError:
        return "no build metadata (rims_fast/_build_info.py); reinstall with " \
               "`pip install --no-build-isolation .`"
    if b.BUILD == "python":
        return f"the package was installed without the extension ({b.REASON})"
    return (f"built for torch {b.TORCH_VERSION} / CUDA {b.CUDA_VERSION}, "
            f"you have torch {torch.__version__} / CUDA {torch.version.cuda}")


def _load_c():
    try:
        from . import _C
    except (ImportError, OSError) as e:  # not built, or built against another torch (ABI)
        return None, f"{type(e).__name__}: {e} ({_version_clash_message()})"
    info = dict(_C.build_info())
    if info["torch"] != torch.__version__.split("+")[0]:
        # Loaded despite the clash; the C++ ABI may still differ, so say so once.
        warnings.warn(f"rims_fast._C: {_version_clash_message()}; rebuild it", RuntimeWarning)
    return info, None


BUILD_INFO, C_IMPORT_ERROR = _load_c()
HAVE_C: bool = BUILD_INFO is not None


def _require_c(*tensors: torch.Tensor) -> None:
    if not HAVE_C:
        raise RuntimeError(f"rims_fast._C is not available: {C_IMPORT_ERROR}")
    if BUILD_INFO["cuda"] is None and any(t.is_cuda for t in tensors):
        raise RuntimeError("rims_fast._C was built without CUDA (CPU ops only); rebuild it "
                           "with a CUDA torch and nvcc to run on GPU tensors")


# ---- the ops ----------------------------------------------------------------------------

def masked_lstm_cell(gates: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.LSTMCell`` update of the active rows, copy of the inactive ones.

    gates: ``(B, K, 4H)`` pre-activations (input + recurrent terms, both biases); h, c:
    ``(B, K, H)``; mask: ``(B, K)`` bool. All float tensors float32 or float64, one dtype.
    Returns ``(h_new, c_new)``, each ``(B, K, H)``. Differentiable in gates, h and c.
    """
    _require_c(gates)
    return torch.ops.rims_fast.masked_lstm_cell_fwd(gates, h, c, mask)


def masked_gru_cell(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """``nn.GRUCell`` update of the active rows, copy of the inactive ones.

    gi: ``(B, K, 3H)`` input term incl. ``bias_ih``; gh: ``(B, K, 3H)`` recurrent term incl.
    ``bias_hh``; h: ``(B, K, H)``; mask: ``(B, K)`` bool. Returns ``h_new`` ``(B, K, H)``.
    Differentiable in gi, gh and h (h's gradient here is its direct term only; the path through
    gh is the caller's).
    """
    _require_c(gi)
    return torch.ops.rims_fast.masked_gru_cell_fwd(gi, gh, h, mask)


# ---- pure PyTorch references (same signatures): the package reference's cell updates --------

masked_lstm_cell_ref = lstm_cell_ref
masked_gru_cell_ref = gru_cell_ref


# ---- fake impls and autograd (registered only when the ops exist) -----------------------

def _register() -> None:
    lib = "rims_fast::"

    # Outputs are always fresh contiguous tensors (the kernels allocate them so): new_empty.
    @torch.library.register_fake(lib + "masked_lstm_cell_fwd")
    def _(gates, h, c, mask):
        return h.new_empty(h.shape), c.new_empty(c.shape)

    @torch.library.register_fake(lib + "masked_lstm_cell_bwd")
    def _(grad_h_new, grad_c_new, gates, c, mask):
        return gates.new_empty(gates.shape), c.new_empty(c.shape), c.new_empty(c.shape)

    @torch.library.register_fake(lib + "masked_gru_cell_fwd")
    def _(gi, gh, h, mask):
        return h.new_empty(h.shape)

    @torch.library.register_fake(lib + "masked_gru_cell_bwd")
    def _(grad_h_new, gi, gh, h, mask):
        return gi.new_empty(gi.shape), gh.new_empty(gh.shape), h.new_empty(h.shape)

    # The backward ops recompute the activations, so only the inputs are saved.
    def lstm_setup_context(ctx, inputs, output):
        gates, _h, c, mask = inputs
        ctx.save_for_backward(gates, c, mask)

    def lstm_backward(ctx, grad_h_new, grad_c_new):
        gates, c, mask = ctx.saved_tensors
        grad_h_new = torch.zeros_like(c) if grad_h_new is None else grad_h_new
        grad_c_new = torch.zeros_like(c) if grad_c_new is None else grad_c_new
        grad_gates, grad_h, grad_c = torch.ops.rims_fast.masked_lstm_cell_bwd(
            grad_h_new, grad_c_new, gates, c, mask)
        return grad_gates, grad_h, grad_c, None

    def gru_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # gi, gh, h, mask

    def gru_backward(ctx, grad_h_new):
        gi, gh, h, mask = ctx.saved_tensors
        grad_gi, grad_gh, grad_h = torch.ops.rims_fast.masked_gru_cell_bwd(
            grad_h_new, gi, gh, h, mask)
        return grad_gi, grad_gh, grad_h, None

    torch.library.register_autograd(lib + "masked_lstm_cell_fwd", lstm_backward,
                                    setup_context=lstm_setup_context)
    torch.library.register_autograd(lib + "masked_gru_cell_fwd", gru_backward,
                                    setup_context=gru_setup_context)


if HAVE_C:
    _register()
