"""Column-tiled forward Triton kernels of one RIM step (SPEC.md steps 1-3 and the communication
projections of step 4), for wide layers, and their thin launchers.

The fused cell kernel (:mod:`.rim_step_fwd`) gives a program one batch tile and one mechanism and
makes it compute all of that mechanism's gate columns and its communication Q|K|V, after the
input queries of all K mechanisms (the competition needs every ``p``). That is few programs with
large register tiles: at ``large`` (H = 256) a program holds four ``(BLOCK_B, 256)`` gate
accumulators and multiplies four ``256 x 256`` weight tiles, and a batch tile of 16 samples reads
each weight 16 times per step at B = 256. Here the same arithmetic is spread over three kernels,
so the gate products get a grid over ``(batch tile x mechanism x unit tile)`` (issue 3's design):

- :func:`_rim_query_fwd_kernel`, grid ``(cdiv(B, BLOCK_B), K)``: the input queries of mechanism
  ``k``, the scores, the null softmax per head; writes the undropped probabilities ``a``
  ``(B, K, NI, M)`` and ``p`` ``(B, K)`` (each mechanism's queries computed once, not K times).
- :func:`_rim_gates_fwd_kernel`, grid ``(cdiv(B, BLOCK_B), K, cdiv(H, BLOCK_U))``: the rank rule
  from the ``K`` values of ``p`` (program ``(i, k, 0)`` writes the mask), the input term of units
  ``u0 .. u0 + BLOCK_U - 1`` (their columns of every gate in the folded ``XW``), the recurrent
  products ``h_k W_hh[k][:, g H + u0 ...]`` per gate ``g``, and the masked LSTM/GRU update of those
  units: a program owns whole hidden units, so the cell needs nothing from other programs.
- :func:`_rim_comm_qkv_fwd_kernel`, grid ``(cdiv(B, BLOCK_B), K, 3)``: the communication Q, K or
  V of ``h~_k`` (it needs the whole row, hence its own kernel; one projection per program keeps
  one accumulator live).

The communication itself (step 4's attention, step 5) is :func:`.rim_step_fwd.rim_comm_fwd`:
four launches per step instead of two. Every value is computed by the same expressions in the
same order as the fused kernels (products as ``tl.dot`` over the same reduction), and the saved
tensors are the same, so the Triton backward serves both.
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from .rim_step_fwd import (_dropout, _gates_cell, _null_softmax_head, _proj_store, _query, _rnd, cdiv,
                           pad, pad_dot)

__all__ = ["rim_query_fwd", "rim_gates_fwd", "rim_comm_qkv_fwd", "tile_sizes", "Tiles"]


@triton.jit
def _xw_cols(xw_ptr, a, offs_b, b_ok, k, n, col0, ncol, M, K: tl.constexpr, NI: tl.constexpr,
             GH: tl.constexpr, M_P: tl.constexpr, U_P: tl.constexpr):
    """``sum_m a[b, m] XW[b, k, n, m, col0:col0+ncol]``, ``XW`` ``(B, K, NI, M, GH)`` float32."""
    offs_m = tl.arange(0, M_P)
    offs_u = tl.arange(0, U_P)
    base = ((offs_b[:, None, None] * K + k) * NI + n) * M
    ptrs = xw_ptr + (base + offs_m[None, :, None]) * GH + col0 + offs_u[None, None, :]
    ok = b_ok[:, None, None] & (offs_m[None, :, None] < M) & (offs_u[None, None, :] < ncol)
    xw = tl.load(ptrs, mask=ok, other=0.0)
    return tl.sum(a[:, :, None] * xw, axis=1)


@triton.jit(do_not_specialize=["t"])
def _rim_query_fwd_kernel(
    h_ptr,                   # (B, K, H) float32 state of step t-1
    keys_ptr,                # (T, B, M, NI*DK) float32 input keys (rounded to the storage dtype)
    wq_ptr,                  # input_query (K, H, NI*DK), storage dtype
    p_ptr,                   # out: (B, K) float32 mean null probability
    a_ptr,                   # out: (B, K, NI, M) float32 undropped input probabilities
    B, M, t, scale,
    K: tl.constexpr, H: tl.constexpr, NI: tl.constexpr, DK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, DK_P: tl.constexpr, M_P: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    k = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_m = tl.arange(0, M_P)
    keys_t = keys_ptr + t.to(tl.int64) * B * M * (NI * DK)
    psum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for n in tl.static_range(NI):
        q = _query(h_ptr, wq_ptr, offs_b, b_ok, k, n, K, H, NI, DK, BLOCK_K, DK_P, PREC)
        a, a_null = _null_softmax_head(q, keys_t, n, offs_b, b_ok, M, NI, DK, DK_P, M_P, scale)
        psum += a_null
        tl.store(a_ptr + ((offs_b[:, None] * K + k) * NI + n) * M + offs_m[None, :], a,
                 mask=b_ok[:, None] & (offs_m[None, :] < M))
    tl.store(p_ptr + offs_b * K + k, psum / NI, mask=b_ok)


@triton.jit(do_not_specialize=["t", "t_xw", "seed"])
def _rim_gates_fwd_kernel(
    h_ptr, c_ptr,            # (B, K, H) float32 state of step t-1 (c unused for GRU)
    p_ptr, a_ptr,            # (B, K), (B, K, NI, M) float32 from the query kernel
    xw_ptr,                  # (T', B, K, NI, M, G*H) float32 folded input term (step t at t_xw)
    whh_ptr,                 # weight_hh (K, H, G*H), storage dtype
    bih_ptr, bhh_ptr,        # bias_ih, bias_hh (K, G*H), storage dtype
    ht_ptr, cn_ptr,          # out: (B, K, H) float32 h~ and c of step t (this program's units)
    mask_ptr,                # out: (T, B, K) int8 active mask (written by unit tile 0)
    gates_ptr,               # out if SAVE: (T, B, K, GW) gate pre-activations
    B, M, t, t_xw, seed, p_drop,
    K: tl.constexpr, H: tl.constexpr, NI: tl.constexpr, G: tl.constexpr, TOP_K: tl.constexpr,
    IS_LSTM: tl.constexpr, HAS_DROP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr,
    BLOCK_K: tl.constexpr, M_P: tl.constexpr, K_P: tl.constexpr, PREC: tl.constexpr,
    SAVE: tl.constexpr,
):
    pid_b = tl.program_id(0)
    k = tl.program_id(1)
    u0 = tl.program_id(2) * BLOCK_U
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_k = tl.arange(0, K_P)
    offs_m = tl.arange(0, M_P)
    nu = H - u0  # units of this tile (masks clip it to BLOCK_U)
    GH: tl.constexpr = G * H
    WDT = whh_ptr.dtype.element_ty
    t64 = t.to(tl.int64)
    xw_t = xw_ptr + t_xw.to(tl.int64) * B * K * NI * M * GH

    # 2. k's rank among the K values of p: active iff fewer than TOP_K beat it (SPEC's rule).
    p_all = tl.load(p_ptr + offs_b[:, None] * K + offs_k[None, :],
                    mask=b_ok[:, None] & (offs_k[None, :] < K), other=0.0)
    p_k = tl.sum(tl.where(offs_k[None, :] == k, p_all, 0.0), axis=1)
    beats = (p_all < p_k[:, None]) | ((p_all == p_k[:, None]) & (offs_k[None, :] < k))
    beats = beats & (offs_k[None, :] < K)
    active = tl.sum(beats.to(tl.int32), axis=1) < TOP_K  # (BLOCK_B,)
    tl.store(mask_ptr + (t64 * B + offs_b) * K + k, active.to(tl.int8), mask=b_ok & (u0 == 0))

    # 3. The input term of this tile's units (every gate's columns), then the recurrent term.
    acc0 = tl.zeros((BLOCK_B, BLOCK_U), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_B, BLOCK_U), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B, BLOCK_U), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_B, BLOCK_U), dtype=tl.float32)
    for n in tl.static_range(NI):
        offs = (((t64 * B + offs_b[:, None]) * K + k) * NI + n) * M + offs_m[None, :]
        a = tl.load(a_ptr + ((offs_b[:, None] * K + k) * NI + n) * M + offs_m[None, :],
                    mask=b_ok[:, None] & (offs_m[None, :] < M), other=0.0)
        if HAS_DROP:  # the fused kernel's stream and offsets: the same keep-mask
            a = _dropout(a, seed, offs.to(tl.int32), p_drop)
        a = _rnd(a, WDT)
        acc0 += _xw_cols(xw_t, a, offs_b, b_ok, k, n, u0, nu, M, K, NI, GH, M_P, BLOCK_U)
        acc1 += _xw_cols(xw_t, a, offs_b, b_ok, k, n, H + u0, nu, M, K, NI, GH, M_P, BLOCK_U)
        acc2 += _xw_cols(xw_t, a, offs_b, b_ok, k, n, 2 * H + u0, nu, M, K, NI, GH, M_P, BLOCK_U)
        if IS_LSTM:
            acc3 += _xw_cols(xw_t, a, offs_b, b_ok, k, n, 3 * H + u0, nu, M, K, NI, GH, M_P,
                             BLOCK_U)
    _gates_cell(acc0, acc1, acc2, acc3, active, h_ptr, c_ptr, whh_ptr, bih_ptr, bhh_ptr, ht_ptr,
                cn_ptr, gates_ptr, offs_b, b_ok, k, u0, nu, t64, B, K, H, G, IS_LSTM, SAVE,
                BLOCK_K, BLOCK_U, PREC)


@triton.jit
def _rim_comm_qkv_fwd_kernel(
    ht_ptr,                  # (B, K, H) float32 h~ of step t
    cq_ptr, ck_ptr, cv_ptr,  # comm_query/comm_key (K, H, NC*DC), comm_value (K, H, NC*DCV)
    qc_ptr, kc_ptr, vc_ptr,  # out: (B, K, NC*DC|DCV) float32 communication Q, K, V (rounded)
    B,
    K: tl.constexpr, H: tl.constexpr, NC: tl.constexpr, DC: tl.constexpr, DCV: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, CQ_P: tl.constexpr, CV_P: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    k = tl.program_id(1)
    which = tl.program_id(2)  # 0: Q, 1: K, 2: V (one accumulator per program)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    if which == 0:
        _proj_store(ht_ptr, cq_ptr, qc_ptr, offs_b, b_ok, k, K, H, NC * DC, BLOCK_K, CQ_P, PREC)
    elif which == 1:
        _proj_store(ht_ptr, ck_ptr, kc_ptr, offs_b, b_ok, k, K, H, NC * DC, BLOCK_K, CQ_P, PREC)
    else:
        _proj_store(ht_ptr, cv_ptr, vc_ptr, offs_b, b_ok, k, K, H, NC * DCV, BLOCK_K, CV_P, PREC)


# ---------------------------------------------------------------- launchers (no autograd here)


class Tiles(NamedTuple):
    """Tile sizes of the tiled kernels: samples per program, hidden units per gates program, rows of
    a reduction chunk, warps per program."""

    block_b: int
    block_u: int
    block_k: int
    num_warps: int


def tile_sizes(B: int, H: int, fp32: bool = False) -> Tiles:
    """The tiles for ``B`` samples of ``H`` units (``fp32``: float32 weights). Chosen without a
    GPU run, from the compiler's resource report (``tools/triton_resources.py``: no spills at
    ``paper`` and ``large`` with Triton 3.6 and 3.8), not from timings: 64 samples once a batch has
    four such tiles (each weight column is then read ``B / 64`` times per step instead of
    ``B / 16``), else 16 (``tl.dot``'s smallest M); 32 units (16 for ``H <= 32``); reduction
    chunks of 32 rows, 16 in float32 (whose "tf32x3" products split each operand in two); 8 warps
    with 64 samples, else 4."""
    bb = 64 if B >= 256 else 16
    return Tiles(bb, 16 if H <= 32 else 32, 16 if fp32 else 32, 8 if bb == 64 else 4)


def rim_query_fwd(h, keys, wq, p, a, *, t, M, K, H, NI, DK, prec, tiles: Tiles):
    """Launch :func:`_rim_query_fwd_kernel` for step ``t``: writes ``p`` ``(B, K)`` and the
    undropped input probabilities ``a`` ``(B, K, NI, M)`` (contiguous; a slice of the saved
    ``(T, ...)`` history when saving)."""
    B = h.shape[0]
    _rim_query_fwd_kernel[(cdiv(B, tiles.block_b), K)](
        h, keys, wq, p, a, B, M, t, 1.0 / DK ** 0.5,
        K=K, H=H, NI=NI, DK=DK, BLOCK_B=tiles.block_b, BLOCK_K=tiles.block_k, DK_P=pad_dot(DK),
        M_P=pad(M), PREC=prec, num_warps=tiles.num_warps)


def rim_gates_fwd(h, c, p, a, xw, whh, bih, bhh, ht, cn, masks, *, t, M, K, H, NI, top_k, lstm,
                  seed, p_drop, prec, tiles: Tiles, gates=None, t_xw=None):
    """Launch :func:`_rim_gates_fwd_kernel` for step ``t`` (``xw`` holds it at ``t_xw``, default
    ``t``); with ``gates`` ``(T, B, K, GW)`` float32 given, also saves the gate pre-activations as
    :func:`.rim_step_fwd.rim_cell_fwd` does."""
    B = h.shape[0]
    grid = (cdiv(B, tiles.block_b), K, cdiv(H, tiles.block_u))
    save = gates is not None
    _rim_gates_fwd_kernel[grid](
        h, c, p, a, xw, whh, bih, bhh, ht, cn, masks, gates if save else h,
        B, M, t, t if t_xw is None else t_xw, seed, float(p_drop),
        K=K, H=H, NI=NI, G=4 if lstm else 3, TOP_K=top_k, IS_LSTM=lstm, HAS_DROP=p_drop > 0,
        BLOCK_B=tiles.block_b, BLOCK_U=tiles.block_u, BLOCK_K=tiles.block_k, M_P=pad(M),
        K_P=pad(K), PREC=prec, SAVE=save, num_warps=tiles.num_warps)


def rim_comm_qkv_fwd(ht, cq, ck, cv, qc, kc, vc, *, K, H, NC, DC, DCV, prec, tiles: Tiles):
    """Launch :func:`_rim_comm_qkv_fwd_kernel`: Q, K, V (rounded) of every mechanism's ``h~``."""
    B = ht.shape[0]
    _rim_comm_qkv_fwd_kernel[(cdiv(B, tiles.block_b), K, 3)](
        ht, cq, ck, cv, qc, kc, vc, B,
        K=K, H=H, NC=NC, DC=DC, DCV=DCV, BLOCK_B=tiles.block_b, BLOCK_K=tiles.block_k,
        CQ_P=pad_dot(NC * DC), CV_P=pad_dot(NC * DCV), PREC=prec, num_warps=tiles.num_warps)
