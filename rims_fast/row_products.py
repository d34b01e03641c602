"""Weight gradients as sums over all ``T*B`` rows: per mechanism ``sum_{t,b} a[t,b,k]^T y[t,b,k]``.

Why not ``torch.einsum("tbkh,tbkg->khg", ...)``: einsum orders the contracted labels
alphabetically, so ``t, b`` become ``(b, t)`` and both operands are copied into that permuted
layout before the batched GEMM — two strided copies of every ``(T, B, K, width)`` operand (seen
in a CPU profile of the same backward). They are the likely source of the 20 strided-copy
launches, ~35 ms of a 274 ms ``large`` forward+backward on an H100, that the profile there showed
without shapes (``benchmarks/results/nvidia-h100-profile-steps-2026-11-27a.log``,
``aten::copy_``); not yet re-profiled.
Viewing ``(T, B)`` as one row axis keeps the operands where they are: ``(K, X, T*B)`` and
``(K, T*B, Y)`` with leading dimension ``K*X`` / ``K*Y``, which cuBLAS's strided-batched GEMM
reads in place (and ``torch.bmm`` passes through without a copy).
"""

from __future__ import annotations

from torch import Tensor


def mechanism_rows_product(a: Tensor, y: Tensor) -> Tensor:
    """``(T, B, K, X)``, ``(T, B, K, Y)`` -> ``(K, X, Y)``: per mechanism ``k``, the sum over the
    rows ``(t, b)`` of ``a[t, b, k]^T y[t, b, k]``. Both operands need a unit last stride and
    ``(T, B)`` mergeable (contiguous tensors and last-dimension slices of them are)."""
    if a.dim() != 4 or y.dim() != 4 or a.shape[:3] != y.shape[:3]:
        raise ValueError(f"mechanism_rows_product: want (T, B, K, X) and (T, B, K, Y), "
                         f"got {tuple(a.shape)} and {tuple(y.shape)}")
    K = a.shape[2]
    rows_a = a.reshape(-1, K, a.shape[3])  # a view for the layouts above
    rows_y = y.reshape(-1, K, y.shape[3])
    return rows_a.permute(1, 2, 0).bmm(rows_y.transpose(0, 1))


def rows_product(a: Tensor, y: Tensor) -> Tensor:
    """``(..., X)``, ``(..., Y)`` -> ``(X, Y)``: the sum over all leading indices of
    ``a[...]^T y[...]`` (the hoisted input projection's gradient)."""
    return a.reshape(-1, a.shape[-1]).t() @ y.reshape(-1, y.shape[-1])
