"""Forward Triton kernels of one RIM step (SPEC.md steps 1-5) and their thin launchers.

Two kernels per step, each on a grid of ``(cdiv(B, BLOCK_B), K)`` programs; program ``(i, k)``
owns samples ``[i*BLOCK_B, (i+1)*BLOCK_B)`` and mechanism ``k``:

- :func:`_rim_cell_fwd_kernel` (steps 1-3, plus the communication projections of step 4): loops
  over all K mechanisms to compute ``p_j`` (so the competition is local to the program: SPEC's
  rank rule as a comparison count, no sort), then for its own ``k``: input attention read (as the
  attention-weighted sum of the precomputed folded input term ``XW``), gate products
  ``h_k W_hh[k]``, the masked LSTM/GRU update, and ``Q_k, K_k, V_k`` of the communication from
  the new ``h~_k``.
- :func:`_rim_comm_fwd_kernel` (steps 4-5): multi-head softmax of ``Q_k`` over the K keys, read
  of the values, output projection, residual for active ``k``, copy for inactive; writes the
  float32 carried state and ``out[t]`` in the output dtype.

With ``SAVE`` (only when the Triton backward will run, see ``rims_fast.rim_triton``) the cell
kernel also stores the gate pre-activations and the undropped input probabilities, and the comm
kernel the undropped communication probabilities and the read ``o``, into ``(T, ...)`` buffers;
the launcher then passes per-step slices of the ``h``/``c``/``h~``/``Q,K,V`` histories as the
state and workspace arguments, so those are saved without copies.

Kernels take contiguous tensors; layouts are documented per argument. All products accumulate in
float32 (``tl.dot``; ``input_precision`` from the launcher: "tf32" when PyTorch allows TF32, else
"tf32x3", see ``rims_fast.rim_triton.FP32_DOT``);
operands are rounded to the storage dtype first, as :mod:`rims_fast.reference` does. ``tl.dot``
operands are padded to >= 16 in every dim with masked loads.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (CPU), half-precision tl.dot is not usable: products of operands that
# are already rounded to the storage dtype are then done in float32 (the same values, exactly).
_INTERP = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

__all__ = ["rim_cell_fwd", "rim_comm_fwd", "rim_dropout_masks", "pad_dot", "pad", "cdiv"]

# Host-side sizes in plain Python: triton.next_power_of_2 and triton.cdiv are ConstexprFunctions,
# ~1.6 us a call from host code (Triton 3.6 and 3.8), and the launchers make ~10 such calls per
# step: ~15 us of the eager loop's ~60 us of Python per step (launches stubbed, this machine).


def pad(n: int) -> int:
    """Next power of two (a ``tl.arange`` size); ``triton.next_power_of_2``'s values."""
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0


def pad_dot(n: int) -> int:
    """Next power of two, at least 16 (a ``tl.dot`` dimension)."""
    return max(16, pad(n))


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv``: ceil(a / b) for positive b."""
    return -(-int(a) // int(b))


@triton.jit
def _tanh(x):
    # tanh via exp (no libdevice dependency; saturates correctly to +-1 for large |x|).
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _rnd(x, DT: tl.constexpr):
    """Round float32 ``x`` to the storage dtype ``DT`` (nearest-even) and back to float32."""
    if DT == tl.bfloat16:
        # Explicit round-to-nearest-even on the bits (the interpreter's cast truncates).
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    elif DT == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_rows(ptr, offs_b, b_ok, k, K: tl.constexpr, W: tl.constexpr, col0, NCOL: tl.constexpr,
               C_P: tl.constexpr):
    """``ptr[b, k, col0:col0+NCOL]`` of a ``(B, K, W)`` float tensor as a ``(BLOCK_B, C_P)`` tile."""
    offs_c = tl.arange(0, C_P)
    ptrs = ptr + (offs_b[:, None] * K + k) * W + col0 + offs_c[None, :]
    return tl.load(ptrs, mask=b_ok[:, None] & (offs_c[None, :] < NCOL), other=0.0)


@triton.jit
def _proj(x, w_ptr, k, row0, col0, R: tl.constexpr, C: tl.constexpr, NROW: tl.constexpr,
          NCOL: tl.constexpr, R_P: tl.constexpr, C_P: tl.constexpr, PREC: tl.constexpr):
    """``x @ W[k][row0:row0+NROW, col0:col0+NCOL]`` with ``W`` ``(K, R, C)`` row-major; ``x`` is
    ``(BLOCK_B, R_P)`` float32 already rounded to the weight dtype (so the cast is exact); float32
    accumulation; result ``(BLOCK_B, C_P)``."""
    offs_r = tl.arange(0, R_P)
    offs_c = tl.arange(0, C_P)
    ptrs = w_ptr + k * (R * C) + (row0 + offs_r[:, None]) * C + col0 + offs_c[None, :]
    w = tl.load(ptrs, mask=(offs_r[:, None] < NROW) & (offs_c[None, :] < NCOL), other=0.0)
    if _INTERP:
        return tl.dot(x, w.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(x.to(w.dtype), w, input_precision=PREC)


# Products of a state row with a weight loop over their reduction dimension (H) in chunks of
# BLOCK_K rows, as a GEMM does, so that a program's registers hold a (BLOCK_B, BLOCK_K) slice of its
# rows and (BLOCK_K, N) weight tiles rather than whole (BLOCK_B, H) rows and (H, N) tiles, which
# spill (tools/triton_resources.py: 312 B per thread at `paper` in bf16, 6 KB at `large`).


@triton.jit
def _row_chunk(x_ptr, offs_b, b_ok, k, K: tl.constexpr, W: tl.constexpr, j0,
               BLOCK_K: tl.constexpr, WDT: tl.constexpr):
    """``x[b, k, j0:j0+BLOCK_K]`` of a ``(B, K, W)`` float32 tensor, rounded to ``WDT`` (zero
    past ``W``)."""
    offs_j = j0 + tl.arange(0, BLOCK_K)
    ptrs = x_ptr + (offs_b[:, None] * K + k) * W + offs_j[None, :]
    return _rnd(tl.load(ptrs, mask=b_ok[:, None] & (offs_j[None, :] < W), other=0.0), WDT)


@triton.jit
def _dot_chunk(acc, x, w_ptr, k, R: tl.constexpr, C: tl.constexpr, j0, col0, ncol,
               BLOCK_K: tl.constexpr, U_P: tl.constexpr, PREC: tl.constexpr):
    """``acc + x @ W[k][j0:j0+BLOCK_K, col0:col0+ncol]`` with ``W`` ``(K, R, C)`` row-major,
    ``x`` ``(BLOCK_B, BLOCK_K)`` float32 rounded to the weight dtype (so the cast is exact);
    float32 accumulation; ``(BLOCK_B, U_P)``, zero past ``ncol``."""
    offs_r = j0 + tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, U_P)
    ptrs = w_ptr + k * (R * C) + offs_r[:, None] * C + col0 + offs_c[None, :]
    w = tl.load(ptrs, mask=(offs_r[:, None] < R) & (offs_c[None, :] < ncol), other=0.0)
    if _INTERP:
        return acc + tl.dot(x, w.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(x.to(w.dtype), w, acc, input_precision=PREC)


@triton.jit
def _proj_store(x_ptr, w_ptr, out_ptr, offs_b, b_ok, k, K: tl.constexpr, H: tl.constexpr,
                N: tl.constexpr, BLOCK_K: tl.constexpr, N_P: tl.constexpr, PREC: tl.constexpr):
    """``out[b, k] = rnd(rnd(x[b, k]) @ W[k])`` for ``x`` ``(B, K, H)``, ``W`` ``(K, H, N)``,
    ``out`` ``(B, K, N)`` float32."""
    WDT = w_ptr.dtype.element_ty
    acc = tl.zeros((offs_b.shape[0], N_P), dtype=tl.float32)
    for j0 in range(0, H, BLOCK_K):
        xk = _row_chunk(x_ptr, offs_b, b_ok, k, K, H, j0, BLOCK_K, WDT)
        acc = _dot_chunk(acc, xk, w_ptr, k, H, N, j0, 0, N, BLOCK_K, N_P, PREC)
    offs_n = tl.arange(0, N_P)
    tl.store(out_ptr + (offs_b[:, None] * K + k) * N + offs_n[None, :], _rnd(acc, WDT),
             mask=b_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _query(h_ptr, wq_ptr, offs_b, b_ok, k, n, K: tl.constexpr, H: tl.constexpr, NI: tl.constexpr,
           DK: tl.constexpr, BLOCK_K: tl.constexpr, DK_P: tl.constexpr, PREC: tl.constexpr):
    """Head ``n`` of mechanism ``k``'s input query ``rnd(rnd(h_k) input_query[k][:, n])``,
    ``(BLOCK_B, DK_P)``."""
    WDT = wq_ptr.dtype.element_ty
    q = tl.zeros((offs_b.shape[0], DK_P), dtype=tl.float32)
    for j0 in range(0, H, BLOCK_K):
        hk = _row_chunk(h_ptr, offs_b, b_ok, k, K, H, j0, BLOCK_K, WDT)
        q = _dot_chunk(q, hk, wq_ptr, k, H, NI * DK, j0, n * DK, DK, BLOCK_K, DK_P, PREC)
    return _rnd(q, WDT)


@triton.jit
def _gates_cell(acc0, acc1, acc2, acc3, active, h_ptr, c_ptr, whh_ptr, bih_ptr, bhh_ptr, ht_ptr,
                cn_ptr, gates_ptr, offs_b, b_ok, k, u0, nu, t64, B, K: tl.constexpr,
                H: tl.constexpr, G: tl.constexpr, IS_LSTM: tl.constexpr, SAVE: tl.constexpr,
                BLOCK_K: tl.constexpr, U_P: tl.constexpr, PREC: tl.constexpr):
    """SPEC step 3 for hidden units ``u0 .. u0 + nu - 1`` (``nu <= U_P``) of mechanism ``k``:
    ``acc_q`` (``(BLOCK_B, U_P)``) hold the input term of gate ``q`` for those units; adds the
    recurrent products ``h_k W_hh[k]`` (reduction chunks) and the biases, saves the
    pre-activations (``SAVE``; LSTM ``i|f|g|o`` sums, GRU ``gi|gh``) and writes the masked
    LSTM/GRU update of those units to ``ht`` (and ``cn``). The fused cell kernel calls it for all
    units (``u0 = 0``), the tiled gates kernel for its unit tile."""
    GH = G * H
    WDT = whh_ptr.dtype.element_ty
    offs_u = u0 + tl.arange(0, U_P)
    u_ok = offs_u < H
    # The recurrent products of the four (GRU: three) gates, one pass over h's chunks. LSTM: into
    # the input term's accumulators (only the sum is used); GRU: apart (r scales gh_n alone).
    if IS_LSTM:
        gh0, gh1, gh2, gh3 = acc0, acc1, acc2, acc3
    else:
        gh0 = tl.zeros((offs_b.shape[0], U_P), dtype=tl.float32)
        gh1 = tl.zeros((offs_b.shape[0], U_P), dtype=tl.float32)
        gh2 = tl.zeros((offs_b.shape[0], U_P), dtype=tl.float32)
    for j0 in range(0, H, BLOCK_K):
        hk = _row_chunk(h_ptr, offs_b, b_ok, k, K, H, j0, BLOCK_K, WDT)
        gh0 = _dot_chunk(gh0, hk, whh_ptr, k, H, GH, j0, u0, nu, BLOCK_K, U_P, PREC)
        gh1 = _dot_chunk(gh1, hk, whh_ptr, k, H, GH, j0, H + u0, nu, BLOCK_K, U_P, PREC)
        gh2 = _dot_chunk(gh2, hk, whh_ptr, k, H, GH, j0, 2 * H + u0, nu, BLOCK_K, U_P, PREC)
        if IS_LSTM:
            gh3 = _dot_chunk(gh3, hk, whh_ptr, k, H, GH, j0, 3 * H + u0, nu, BLOCK_K, U_P,
                             PREC)
    row = (offs_b[:, None] * K + k) * H + offs_u[None, :]
    ok = b_ok[:, None] & u_ok[None, :]
    h = tl.load(h_ptr + row, mask=ok, other=0.0)
    bi = bih_ptr + k * GH + offs_u
    bh = bhh_ptr + k * GH + offs_u
    gi0 = tl.load(bi, mask=u_ok, other=0.0).to(tl.float32)[None, :]
    gi1 = tl.load(bi + H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
    gi2 = tl.load(bi + 2 * H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
    if not IS_LSTM:
        gi0 += acc0
        gi1 += acc1
        gi2 += acc2
    gh0 += tl.load(bh, mask=u_ok, other=0.0).to(tl.float32)[None, :]
    gh1 += tl.load(bh + H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
    gh2 += tl.load(bh + 2 * H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
    grow = gates_ptr + ((t64 * B + offs_b[:, None]) * K + k) * (GH if IS_LSTM else 2 * GH) \
        + offs_u[None, :]
    if IS_LSTM:
        gi3 = tl.load(bi + 3 * H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        gh3 += tl.load(bh + 3 * H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        c = tl.load(c_ptr + row, mask=ok, other=0.0)
        if SAVE:
            tl.store(grow, gi0 + gh0, mask=ok)
            tl.store(grow + H, gi1 + gh1, mask=ok)
            tl.store(grow + 2 * H, gi2 + gh2, mask=ok)
            tl.store(grow + 3 * H, gi3 + gh3, mask=ok)
        c_cell = _sigmoid(gi1 + gh1) * c + _sigmoid(gi0 + gh0) * _tanh(gi2 + gh2)
        h_cell = _sigmoid(gi3 + gh3) * _tanh(c_cell)
        tl.store(cn_ptr + row, tl.where(active[:, None], c_cell, c), mask=ok)
    else:
        if SAVE:
            tl.store(grow, gi0, mask=ok)
            tl.store(grow + H, gi1, mask=ok)
            tl.store(grow + 2 * H, gi2, mask=ok)
            tl.store(grow + 3 * H, gh0, mask=ok)
            tl.store(grow + 4 * H, gh1, mask=ok)
            tl.store(grow + 5 * H, gh2, mask=ok)
        r = _sigmoid(gi0 + gh0)
        z = _sigmoid(gi1 + gh1)
        nn = _tanh(gi2 + r * gh2)
        h_cell = (1.0 - z) * nn + z * h
    tl.store(ht_ptr + row, tl.where(active[:, None], h_cell, h), mask=ok)


@triton.jit
def _null_softmax_head(q, keys_ptr, n, offs_b, b_ok, M, NI: tl.constexpr, DK: tl.constexpr,
                       DK_P: tl.constexpr, M_P: tl.constexpr, scale):
    """SPEC steps 1-2 for one head: ``q`` ``(BLOCK_B, DK_P)`` (float32, rounded) against the M keys
    of this step, ``keys_ptr`` ``(B, M, NI*DK)`` float32. Returns ``(a (BLOCK_B, M_P), a_null)``
    from the softmax over ``{null, 1..M}`` shifted by ``mu = max(0, max_m s)``."""
    offs_m = tl.arange(0, M_P)
    offs_d = tl.arange(0, DK_P)
    ptrs = (keys_ptr + offs_b[:, None, None] * (M * (NI * DK)) + offs_m[None, :, None] * (NI * DK)
            + n * DK + offs_d[None, None, :])
    ok = b_ok[:, None, None] & (offs_m[None, :, None] < M) & (offs_d[None, None, :] < DK)
    kt = tl.load(ptrs, mask=ok, other=0.0)
    s = tl.sum(q[:, None, :] * kt, axis=2) * scale  # (BLOCK_B, M_P)
    s = tl.where(offs_m[None, :] < M, s, float("-inf"))
    mu = tl.maximum(tl.max(s, axis=1), 0.0)
    e = tl.exp(s - mu[:, None])
    e_null = tl.exp(-mu)
    den = e_null + tl.sum(e, axis=1)
    return e / den[:, None], e_null / den


@triton.jit
def _xw_term(xw_ptr, a, offs_b, b_ok, k, n, g, M, K: tl.constexpr, NI: tl.constexpr,
             H: tl.constexpr, G: tl.constexpr, M_P: tl.constexpr, H_P: tl.constexpr):
    """``sum_m a[b, m] XW[b, k, n, m, g*H:(g+1)*H]``, ``XW`` ``(B, K, NI, M, G*H)`` float32."""
    offs_m = tl.arange(0, M_P)
    offs_h = tl.arange(0, H_P)
    base = ((offs_b[:, None, None] * K + k) * NI + n) * M
    ptrs = xw_ptr + (base + offs_m[None, :, None]) * (G * H) + g * H + offs_h[None, None, :]
    ok = b_ok[:, None, None] & (offs_m[None, :, None] < M) & (offs_h[None, None, :] < H)
    xw = tl.load(ptrs, mask=ok, other=0.0)
    return tl.sum(a[:, :, None] * xw, axis=1)


@triton.jit
def _dropout(v, seed, offs, p_drop):
    """Inverted dropout with a counter-based stream: keep iff ``rand(seed, offs) >= p_drop``.
    ``offs``: the element's flat index in int32 (wrapping at 2^31 the same way in every kernel,
    so the backward and the recompute see the forward's masks); addresses use int64."""
    keep = tl.rand(seed, offs) >= p_drop
    return tl.where(keep, v / (1.0 - p_drop), 0.0)


@triton.jit(do_not_specialize=["t", "t_xw", "seed"])
def _rim_cell_fwd_kernel(
    h_ptr, c_ptr,            # (B, K, H) float32 state of step t-1 (c unused for GRU)
    keys_ptr,                # (T, B, M, NI*DK) float32 input keys (rounded to the storage dtype)
    xw_ptr,                  # (T', B, K, NI, M, G*H) float32 folded input term (step t at t_xw)
    wq_ptr, whh_ptr,         # input_query (K, H, NI*DK), weight_hh (K, H, G*H), storage dtype
    bih_ptr, bhh_ptr,        # bias_ih, bias_hh (K, G*H), storage dtype
    cq_ptr, ck_ptr, cv_ptr,  # comm_query/comm_key (K, H, NC*DC), comm_value (K, H, NC*DCV)
    ht_ptr, cn_ptr,          # out: (B, K, H) float32 h~ and c of step t
    mask_ptr,                # out: (T, B, K) int8 active mask
    qc_ptr, kc_ptr, vc_ptr,  # out: (B, K, NC*DC|DCV) float32 communication Q, K, V (rounded)
    gates_ptr, a_ptr,        # out if SAVE: (T, B, K, GW) gate pre-activations, (T, B, K, NI, M) a
    B, M, t, t_xw, seed, p_drop, scale,
    K: tl.constexpr, H: tl.constexpr, NI: tl.constexpr, DK: tl.constexpr, NC: tl.constexpr,
    DC: tl.constexpr, DCV: tl.constexpr, G: tl.constexpr, TOP_K: tl.constexpr,
    IS_LSTM: tl.constexpr, HAS_DROP: tl.constexpr, BLOCK_B: tl.constexpr, H_P: tl.constexpr,
    BLOCK_K: tl.constexpr, DK_P: tl.constexpr, M_P: tl.constexpr, K_P: tl.constexpr,
    CQ_P: tl.constexpr, CV_P: tl.constexpr, PREC: tl.constexpr, SAVE: tl.constexpr,
):
    pid_b = tl.program_id(0)
    k = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_k = tl.arange(0, K_P)
    WDT = wq_ptr.dtype.element_ty
    t64 = t.to(tl.int64)
    keys_t = keys_ptr + t64 * B * M * (NI * DK)
    xw_t = xw_ptr + t_xw.to(tl.int64) * B * K * NI * M * (G * H)

    # 1-2. p_j of every mechanism (undropped), then k's rank: active iff fewer than TOP_K beat it.
    p_all = tl.zeros((BLOCK_B, K_P), dtype=tl.float32)
    for j in range(K):
        psum = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for n in tl.static_range(NI):
            q = _query(h_ptr, wq_ptr, offs_b, b_ok, j, n, K, H, NI, DK, BLOCK_K, DK_P, PREC)
            a, a_null = _null_softmax_head(q, keys_t, n, offs_b, b_ok, M, NI, DK, DK_P, M_P, scale)
            psum += a_null
        p_all = tl.where(offs_k[None, :] == j, (psum / NI)[:, None], p_all)
    p_k = tl.sum(tl.where(offs_k[None, :] == k, p_all, 0.0), axis=1)
    beats = (p_all < p_k[:, None]) | ((p_all == p_k[:, None]) & (offs_k[None, :] < k))
    beats = beats & (offs_k[None, :] < K)
    active = tl.sum(beats.to(tl.int32), axis=1) < TOP_K  # (BLOCK_B,)
    tl.store(mask_ptr + (t64 * B + offs_b) * K + k, active.to(tl.int8), mask=b_ok)

    # 3. Own mechanism: attention-weighted input term + recurrent term, masked cell update.
    acc0 = tl.zeros((BLOCK_B, H_P), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_B, H_P), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B, H_P), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_B, H_P), dtype=tl.float32)
    offs_m = tl.arange(0, M_P)
    for n in tl.static_range(NI):
        q = _query(h_ptr, wq_ptr, offs_b, b_ok, k, n, K, H, NI, DK, BLOCK_K, DK_P, PREC)
        a, a_null = _null_softmax_head(q, keys_t, n, offs_b, b_ok, M, NI, DK, DK_P, M_P, scale)
        offs = (((t64 * B + offs_b[:, None]) * K + k) * NI + n) * M + offs_m[None, :]
        if SAVE:  # undropped probabilities of the real elements, for the backward
            tl.store(a_ptr + offs, a, mask=b_ok[:, None] & (offs_m[None, :] < M))
        if HAS_DROP:  # the RNG offset: the flat index wrapped to int32 (_dropout)
            a = _dropout(a, seed, offs.to(tl.int32), p_drop)
        a = _rnd(a, WDT)
        acc0 += _xw_term(xw_t, a, offs_b, b_ok, k, n, 0, M, K, NI, H, G, M_P, H_P)
        acc1 += _xw_term(xw_t, a, offs_b, b_ok, k, n, 1, M, K, NI, H, G, M_P, H_P)
        acc2 += _xw_term(xw_t, a, offs_b, b_ok, k, n, 2, M, K, NI, H, G, M_P, H_P)
        if IS_LSTM:
            acc3 += _xw_term(xw_t, a, offs_b, b_ok, k, n, 3, M, K, NI, H, G, M_P, H_P)
    _gates_cell(acc0, acc1, acc2, acc3, active, h_ptr, c_ptr, whh_ptr, bih_ptr, bhh_ptr, ht_ptr,
                cn_ptr, gates_ptr, offs_b, b_ok, k, 0, H, t64, B, K, H, G, IS_LSTM, SAVE, BLOCK_K,
                H_P, PREC)

    # 4 (first half). Communication projections of k from h~_k (all mechanisms offer K and V),
    # in chunks read back from ht (_row_chunk's comment): the barrier (bar.sync, which orders
    # global memory within the block, as __syncthreads) makes this program's stores of h~ visible
    # to all its threads. Triton calls tl.debug_barrier a debugging aid; this relies on its
    # lowering to bar.sync.
    tl.debug_barrier()
    _proj_store(ht_ptr, cq_ptr, qc_ptr, offs_b, b_ok, k, K, H, NC * DC, BLOCK_K, CQ_P, PREC)
    _proj_store(ht_ptr, ck_ptr, kc_ptr, offs_b, b_ok, k, K, H, NC * DC, BLOCK_K, CQ_P, PREC)
    _proj_store(ht_ptr, cv_ptr, vc_ptr, offs_b, b_ok, k, K, H, NC * DCV, BLOCK_K, CV_P, PREC)


@triton.jit(do_not_specialize=["t", "seed"])
def _rim_comm_fwd_kernel(
    ht_ptr,                  # (B, K, H) float32 h~ of step t
    mask_ptr,                # (T, B, K) int8 active mask
    qc_ptr, kc_ptr, vc_ptr,  # (B, K, NC*DC|DCV) float32 communication Q, K, V
    co_ptr,                  # comm_output (K, NC*DCV, H), storage dtype
    h_ptr,                   # out: (B, K, H) float32 state of step t
    out_ptr,                 # out: (T, B, K*H) output dtype
    bp_ptr, o_ptr,           # out if SAVE: (T, B, K, NC, K) undropped probs, (T, B, K, NC*DCV) read
    B, t, seed, p_drop, scale,
    K: tl.constexpr, H: tl.constexpr, NC: tl.constexpr, DC: tl.constexpr, DCV: tl.constexpr,
    HAS_DROP: tl.constexpr, BLOCK_B: tl.constexpr, H_P: tl.constexpr, K_P: tl.constexpr,
    DC_P: tl.constexpr, DCV_P: tl.constexpr, PREC: tl.constexpr, SAVE: tl.constexpr,
):
    pid_b = tl.program_id(0)
    k = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_k = tl.arange(0, K_P)
    offs_h = tl.arange(0, H_P)
    WDT = co_ptr.dtype.element_ty
    t64 = t.to(tl.int64)
    active = tl.load(mask_ptr + (t64 * B + offs_b) * K + k, mask=b_ok, other=0) != 0
    ht = _load_rows(ht_ptr, offs_b, b_ok, k, K, H, 0, H, H_P)
    add = tl.zeros((BLOCK_B, H_P), dtype=tl.float32)
    for n in tl.static_range(NC):
        q = _load_rows(qc_ptr, offs_b, b_ok, k, K, NC * DC, n * DC, DC, DC_P)
        s = tl.full((BLOCK_B, K_P), float("-inf"), dtype=tl.float32)
        for j in range(K):
            kj = _load_rows(kc_ptr, offs_b, b_ok, j, K, NC * DC, n * DC, DC, DC_P)
            s = tl.where(offs_k[None, :] == j, (tl.sum(q * kj, axis=1) * scale)[:, None], s)
        e = tl.exp(s - tl.max(s, axis=1)[:, None])
        prob = e / tl.sum(e, axis=1)[:, None]
        offs = (((t64 * B + offs_b[:, None]) * K + k) * NC + n) * K + offs_k[None, :]
        if SAVE:
            tl.store(bp_ptr + offs, prob, mask=b_ok[:, None] & (offs_k[None, :] < K))
        if HAS_DROP:
            prob = _dropout(prob, seed, offs.to(tl.int32), p_drop)
        prob = _rnd(prob, WDT)
        o = tl.zeros((BLOCK_B, DCV_P), dtype=tl.float32)
        for j in range(K):
            pj = tl.sum(tl.where(offs_k[None, :] == j, prob, 0.0), axis=1)
            vj = _load_rows(vc_ptr, offs_b, b_ok, j, K, NC * DCV, n * DCV, DCV, DCV_P)
            o += pj[:, None] * vj
        if SAVE:
            offs_v = tl.arange(0, DCV_P)
            tl.store(o_ptr + ((t64 * B + offs_b[:, None]) * K + k) * (NC * DCV) + n * DCV
                     + offs_v[None, :], _rnd(o, WDT), mask=b_ok[:, None] & (offs_v[None, :] < DCV))
        add += _proj(_rnd(o, WDT), co_ptr, k, n * DCV, 0, NC * DCV, H, DCV, H, DCV_P, H_P, PREC)
    h_new = tl.where(active[:, None], ht + add, ht)
    ok = b_ok[:, None] & (offs_h[None, :] < H)
    tl.store(h_ptr + (offs_b[:, None] * K + k) * H + offs_h[None, :], h_new, mask=ok)
    tl.store(out_ptr + (t64 * B + offs_b[:, None]) * (K * H) + k * H + offs_h[None, :],
             _rnd(h_new, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rim_dropout_masks_fwd_kernel(keep_ptr, N, seed, p_drop, BLOCK: tl.constexpr):
    """``keep[i] = rand(seed, i) >= p_drop`` for a flat index ``i``: the same stream as the
    kernels above, so a recompute sees exactly the forward's dropout masks."""
    # Addresses in int64 (a mask may exceed 2^31 elements); the RNG offset is the flat index
    # wrapped to int32, as the kernels' int32 offset arithmetic wraps it.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, offs.to(tl.int32)) >= p_drop
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=offs < N)


# ---------------------------------------------------------------- launchers (no autograd here)

BLOCK_B = 16  # samples per program (a tl.dot M dimension: >= 16)
NUM_WARPS = 4
# Warps of the two forward kernels. The cell kernel keeps a mechanism's four (BLOCK_B, H) gate
# accumulators and its state rows live, the communication kernel its (BLOCK_B, H) rows and output
# weight tile: with 4 warps both spill at `large` in float32 (tools/triton_resources.py, Triton
# 3.6: cell 0.4-1 KB per thread before the LSTM gates shared their accumulators, communication
# ~0.6 KB); with 8, at most 56 B. Not yet timed on a GPU.
FWD_NUM_WARPS = 8


def block_k(dtype) -> int:
    """Rows per reduction chunk of the state-row products (_row_chunk's comment): 32, or 16 for
    float32 weights, whose "tf32x3" products split each operand in two (no spills at `paper` and
    `large` with Triton 3.6 and 3.8, tools/triton_resources.py)."""
    import torch

    return 16 if dtype == torch.float32 else 32


def rim_cell_fwd(h, c, keys, xw, wq, whh, bih, bhh, cq, ck, cv, ht, cn, masks, qc, kc, vc, *,
                 t, M, K, H, NI, DK, NC, DC, DCV, top_k, lstm, seed, p_drop, prec,
                 gates=None, a=None, t_xw=None):
    """Launch :func:`_rim_cell_fwd_kernel` for step ``t`` (all tensors contiguous); ``xw`` holds
    step ``t`` at index ``t_xw`` (default ``t``: all steps; a chunk of steps otherwise). With
    ``gates`` ``(T, B, K, GW)`` and ``a`` ``(T, B, K, NI, M)`` float32 given, also saves the gate
    pre-activations (LSTM ``i|f|g|o`` sums, GW = 4H; GRU ``gi|gh``, GW = 6H) and the undropped
    input attention probabilities of step ``t`` for the backward."""
    B = h.shape[0]
    grid = (cdiv(B, BLOCK_B), K)
    save = gates is not None
    _rim_cell_fwd_kernel[grid](
        h, c, keys, xw, wq, whh, bih, bhh, cq, ck, cv, ht, cn, masks, qc, kc, vc,
        gates if save else h, a if save else h,
        B, M, t, t if t_xw is None else t_xw, seed, float(p_drop), 1.0 / DK ** 0.5,
        K=K, H=H, NI=NI, DK=DK, NC=NC, DC=DC, DCV=DCV, G=4 if lstm else 3, TOP_K=top_k,
        IS_LSTM=lstm, HAS_DROP=p_drop > 0, BLOCK_B=BLOCK_B, H_P=pad_dot(H),
        BLOCK_K=block_k(wq.dtype), DK_P=pad_dot(DK),
        M_P=pad(M), K_P=pad(K), CQ_P=pad_dot(NC * DC), CV_P=pad_dot(NC * DCV), PREC=prec,
        SAVE=save, num_warps=FWD_NUM_WARPS)


def rim_comm_fwd(ht, masks, qc, kc, vc, co, h, out, *, t, K, H, NC, DC, DCV, seed, p_drop, prec,
                 bp=None, o=None):
    """Launch :func:`_rim_comm_fwd_kernel` for step ``t`` (all tensors contiguous). With ``bp``
    ``(T, B, K, NC, K)`` and ``o`` ``(T, B, K, NC*DCV)`` float32 given, also saves the undropped
    communication probabilities and the (dropped, rounded) read of step ``t``."""
    B = h.shape[0]
    grid = (cdiv(B, BLOCK_B), K)
    save = bp is not None
    _rim_comm_fwd_kernel[grid](
        ht, masks, qc, kc, vc, co, h, out, bp if save else h, o if save else h,
        B, t, seed, float(p_drop), 1.0 / DC ** 0.5,
        K=K, H=H, NC=NC, DC=DC, DCV=DCV, HAS_DROP=p_drop > 0, BLOCK_B=BLOCK_B, H_P=pad_dot(H),
        K_P=pad(K), DC_P=pad(DC), DCV_P=pad_dot(DCV), PREC=prec, SAVE=save, num_warps=FWD_NUM_WARPS)


def rim_dropout_masks(shape, seed, p_drop, device):
    """The keep masks (bool, ``shape``, row-major flat index = the kernels' RNG offset)."""
    import torch

    n = 1
    for s in shape:
        n *= int(s)
    keep = torch.empty(n, dtype=torch.int8, device=device)
    BLOCK = 1024
    _rim_dropout_masks_fwd_kernel[(cdiv(n, BLOCK),)](keep, n, seed, float(p_drop), BLOCK=BLOCK)
    return keep.view(shape).bool()
