"""Shared test tools: the tolerance table, a printing ``assert_close``, input factories."""

from __future__ import annotations

import torch

import rims_fast

# One table, keyed by the dtype under test; the expected values come from the float64 reference.
# Why these numbers:
# - float64: round-off only. The backends reassociate sums (folded input term, fused kernels), so
#   a few hundred ulps over short sequences; 1e-10 leaves two orders of margin and still catches
#   any real error (which shows at 1e-3 or above).
# - float32: ~1e-7 relative per op, amplified through T recurrent steps and softmaxes; tests run
#   T <= 8 where measured errors are < 1e-5. Weight gradients sum over B*T terms, hence looser.
# - bfloat16/float16: 8/11-bit mantissas on every product operand (the reference rounds operands
#   the same way); states carried in float32 keep it from growing with T at test lengths.
TOL = {
    torch.float64: {"out": (1e-10, 1e-10), "grad_in": (1e-9, 1e-9), "grad_w": (1e-9, 1e-9)},
    torch.float32: {"out": (2e-5, 1e-4), "grad_in": (5e-5, 1e-3), "grad_w": (1e-4, 1e-3)},
    torch.bfloat16: {"out": (3e-2, 5e-2), "grad_in": (5e-2, 1e-1), "grad_w": (1e-1, 1e-1)},
    torch.float16: {"out": (5e-3, 1e-2), "grad_in": (1e-2, 2e-2), "grad_w": (2e-2, 2e-2)},
}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 kind: str = "out") -> None:
    """Print max-abs and max-relative error of ``actual`` against ``expected``, then assert
    ``|actual - expected| <= atol + rtol * |expected|`` elementwise with ``TOL[dtype][kind]``."""
    atol, rtol = TOL[dtype][kind]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs()
    rel = (err / e.abs().clamp_min(1e-12)).max().item() if err.numel() else 0.0
    print(f"{name:>14s} [{str(dtype):>14s}] max_abs={err.max().item() if err.numel() else 0:.3e} "
          f"max_rel={rel:.3e} (atol={atol:g}, rtol={rtol:g})")
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


#: The head sizes of :func:`make_rim`'s layer, for building a twin (RIMCell, BRIM) of it.
SMALL_HEADS = dict(input_heads=2, input_key_size=4, input_value_size=3, comm_heads=2,
                   comm_key_size=3, comm_value_size=2)


def make_rim(seed=0, dtype=torch.float64, **kw):
    """A small RIM with the given overrides; parameters drawn under ``seed``."""
    args = dict(input_size=5, hidden_size=3, num_units=4, top_k=2, **SMALL_HEADS)
    args.update(kw)
    torch.manual_seed(seed)
    return rims_fast.RIM(args.pop("input_size"), args.pop("hidden_size"), args.pop("num_units"),
                         args.pop("top_k"), dtype=dtype, **args)


def random_state(rim, B, dtype=torch.float64, seed=1):
    """A random (h0, c0) (GRU: h0) of the right shape; random so the competition has no ties."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, rim.num_units, rim.hidden_size)
    h = torch.randn(shape, generator=g, dtype=dtype)
    return (h, torch.randn(shape, generator=g, dtype=dtype)) if rim.cell == "lstm" else h
