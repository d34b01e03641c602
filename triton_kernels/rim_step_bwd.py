"""Backward Triton kernels of one RIM step (reverse time) and their thin launchers.

Two kernels per step, each on a grid of ``(cdiv(B, BLOCK_B), K)`` programs, program ``(i, k)``
owning samples ``[i*BLOCK_B, (i+1)*BLOCK_B)`` and mechanism ``k`` (as in the forward):

- :func:`_rim_comm_bwd_kernel` (steps 5-4 backward, the query side): from the carried ``dh'_k``
  (gradient of ``h_t``, ``out[t]``'s gradient included): ``dh'`` of active rows (saved, for
  ``d comm_output``), ``d o_k = dh' comm_output[k]^T``, per head ``d b_{k,j} = d o . V_j``
  (through the forward's regenerated dropout keep-mask), the softmax backward over the K
  mechanisms, ``dQ_k = sum_j ds_{k,j} K_j / sqrt(d_c)``. Inactive ``k`` read nothing: its
  ``d o``, ``ds`` and ``dQ`` are zero. Writes per-step workspaces ``d o`` and ``ds`` (the key/value
  side needs them for all ``k``) and ``dQ[t]``.
- :func:`_rim_cell_bwd_kernel` (step 4's key/value side, then steps 3-1 backward) for mechanism
  ``j``: ``dK_j = sum_k ds_{k,j} Q_k``, ``dV_j = sum_k b~_{k,j} d o_k`` (a loop over ``k``:
  deterministic, no atomics), ``dh~_j = dh'_j + [active_j or not block_inactive_grad]
  (dK_j comm_key[j]^T + dV_j comm_value[j]^T) + dQ_j comm_query[j]^T``; the masked LSTM/GRU
  pointwise backward from the saved gate pre-activations; ``d a~ = dgi . XW`` per element,
  through dropout, the null-softmax backward (the null's value is 0: no gradient of its own),
  ``dq = sum_m ds_m key_m / sqrt(d_k)``; and ``dh_{t-1} = [copy for inactive | z-term for GRU]
  + dgh weight_hh[j]^T + dq input_query[j]^T + dout[t-1]``, written in place over ``dh``
  (``dc_{t-1}`` over ``dc``). Inactive ``j``: ``dh_{t-1} = dh~_j``, ``dc_{t-1} = dc_j``, no gate
  or query gradient.

Per-step gradients the weight GEMMs need (``dQ|dK|dV`` of the communication, ``dh'`` of active
rows, the gate gradients, the input query gradient and the scaled input score gradients) go to
``(T, ...)`` buffers; the weight gradients are large PyTorch GEMMs over all ``T*B`` rows after the
sweep (``rims_fast.rim_triton``). All tensors float32 and contiguous; products accumulate in
float32 with float32 operands (weights are upcast in registers).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .rim_step_fwd import BLOCK_B, NUM_WARPS, _load_rows, _sigmoid, _tanh, cdiv, pad, pad_dot

# The cell backward keeps about fifteen (BLOCK_B, H) float32 tiles live (gates, their gradients,
# states, dh): 8 warps halve their registers per thread (tools/triton_resources.py; the
# communication backward spills more with 8 than with 4 and keeps 4).
CELL_BWD_WARPS = 8

__all__ = ["rim_comm_bwd", "rim_cell_bwd"]


@triton.jit
def _proj_t(x, w_ptr, k, row0, col0, R: tl.constexpr, C: tl.constexpr, NROW: tl.constexpr,
            NCOL: tl.constexpr, R_P: tl.constexpr, C_P: tl.constexpr, PREC: tl.constexpr):
    """``x @ W[k][row0:row0+NROW, col0:col0+NCOL]^T`` with ``W`` ``(K, R, C)`` row-major; ``x``
    ``(BLOCK_B, C_P)`` float32 (zero beyond ``NCOL``); result ``(BLOCK_B, R_P)``, float32."""
    offs_r = tl.arange(0, R_P)
    offs_c = tl.arange(0, C_P)
    ptrs = w_ptr + k * (R * C) + (row0 + offs_r[None, :]) * C + col0 + offs_c[:, None]
    w = tl.load(ptrs, mask=(offs_r[None, :] < NROW) & (offs_c[:, None] < NCOL), other=0.0)
    return tl.dot(x, w.to(tl.float32), input_precision=PREC)


@triton.jit
def _keep_scale(seed, offs, p_drop):
    """``keep / (1 - p)`` of the forward's inverted dropout at RNG offsets ``offs`` (the int32
    flat index: addresses are int64, the random stream's offset wraps at 2^31 as in every
    kernel)."""
    return tl.where(tl.rand(seed, offs) >= p_drop, 1.0 / (1.0 - p_drop), 0.0)


@triton.jit(do_not_specialize=["t", "seed"])
def _rim_comm_bwd_kernel(
    dh_ptr,                  # (B, K, H) float32 gradient of h_t (out[t]'s included)
    mask_ptr,                # (T, B, K) int8 active masks
    qc_ptr, kc_ptr, vc_ptr,  # (T, B, K, NC*DC|DCV) float32 saved communication Q, K, V
    bp_ptr,                  # (T, B, K, NC, K) float32 saved undropped communication probs
    co_ptr,                  # comm_output (K, NC*DCV, H)
    dhp_ptr,                 # out: (T, B, K, H) dh' of active rows, 0 elsewhere
    do_ptr,                  # out: (B, K, NC*DCV) workspace d o (0 for inactive k)
    ds_ptr,                  # out: (B, K, NC, K) workspace d scores * scale (0 for inactive k)
    dq_ptr,                  # out: (T, B, K, NC*DC) dQ
    B, t, seed, p_drop, scale,
    K: tl.constexpr, H: tl.constexpr, NC: tl.constexpr, DC: tl.constexpr, DCV: tl.constexpr,
    HAS_DROP: tl.constexpr, BLOCK_B: tl.constexpr, H_P: tl.constexpr, K_P: tl.constexpr,
    DC_P: tl.constexpr, DCV_P: tl.constexpr, PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    k = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_k = tl.arange(0, K_P)
    offs_h = tl.arange(0, H_P)
    offs_d = tl.arange(0, DC_P)
    offs_v = tl.arange(0, DCV_P)
    t64 = t.to(tl.int64)
    active = tl.load(mask_ptr + (t64 * B + offs_b) * K + k, mask=b_ok, other=0) != 0
    dh = _load_rows(dh_ptr, offs_b, b_ok, k, K, H, 0, H, H_P)
    dh = tl.where(active[:, None], dh, 0.0)
    ok_h = b_ok[:, None] & (offs_h[None, :] < H)
    tl.store(dhp_ptr + ((t64 * B + offs_b[:, None]) * K + k) * H + offs_h[None, :], dh, mask=ok_h)
    kc_t = kc_ptr + t64 * B * K * (NC * DC)
    vc_t = vc_ptr + t64 * B * K * (NC * DCV)
    for n in tl.static_range(NC):
        # d o of head n (zero on inactive rows, since dh is).
        do = _proj_t(dh, co_ptr, k, n * DCV, 0, NC * DCV, H, DCV, H, DCV_P, H_P, PREC)
        tl.store(do_ptr + (offs_b[:, None] * K + k) * (NC * DCV) + n * DCV + offs_v[None, :], do,
                 mask=b_ok[:, None] & (offs_v[None, :] < DCV))
        # d b_{k,j} = d o . V_j, through the dropout keep-mask.
        db = tl.zeros((BLOCK_B, K_P), dtype=tl.float32)
        for j in range(K):
            vj = _load_rows(vc_t, offs_b, b_ok, j, K, NC * DCV, n * DCV, DCV, DCV_P)
            db = tl.where(offs_k[None, :] == j, tl.sum(do * vj, axis=1)[:, None], db)
        offs = (((t64 * B + offs_b[:, None]) * K + k) * NC + n) * K + offs_k[None, :]
        if HAS_DROP:
            db = db * _keep_scale(seed, offs.to(tl.int32), p_drop)
        k_ok = b_ok[:, None] & (offs_k[None, :] < K)
        prob = tl.load(bp_ptr + offs, mask=k_ok, other=0.0)
        ds = prob * (db - tl.sum(prob * db, axis=1)[:, None]) * scale
        ds = tl.where(active[:, None], ds, 0.0)
        tl.store(ds_ptr + ((offs_b[:, None] * K + k) * NC + n) * K + offs_k[None, :], ds,
                 mask=k_ok)
        dq = tl.zeros((BLOCK_B, DC_P), dtype=tl.float32)
        for j in range(K):
            kj = _load_rows(kc_t, offs_b, b_ok, j, K, NC * DC, n * DC, DC, DC_P)
            dsj = tl.sum(tl.where(offs_k[None, :] == j, ds, 0.0), axis=1)
            dq += dsj[:, None] * kj
        tl.store(dq_ptr + ((t64 * B + offs_b[:, None]) * K + k) * (NC * DC) + n * DC
                 + offs_d[None, :], dq, mask=b_ok[:, None] & (offs_d[None, :] < DC))


@triton.jit(do_not_specialize=["t", "t_xw", "seed_in", "seed_c"])
def _rim_cell_bwd_kernel(
    dh_ptr, dc_ptr,          # (B, K, H) float32 carried gradients of h_t, c_t; overwritten with
                             # those of h_{t-1}, c_{t-1} (dc unused for GRU)
    gout_ptr,                # (T, B, K*H) float32 gradient of out (read at t-1 if HAS_GOUT)
    mask_ptr,                # (T, B, K) int8
    hs_ptr, cs_ptr,          # (T+1, B, K, H) float32 saved h and c states (index t = h_{t-1})
    gates_ptr,               # (T, B, K, GW) float32 saved gate pre-activations (LSTM i|f|g|o,
                             # GW = 4H; GRU gi(r|z|n) | gh(r|z|n), GW = 6H)
    a_ptr,                   # (T, B, K, NI, M) float32 saved undropped input probs
    keys_ptr,                # (T, B, M, NI*DK) float32 input keys
    xw_ptr,                  # (T', B, K, NI, M, G*H) float32 folded input term (step t at t_xw)
    qc_ptr,                  # (T, B, K, NC*DC) saved Q
    bp_ptr,                  # (T, B, K, NC, K) saved undropped communication probs
    do_ptr, ds_ptr,          # workspaces of _rim_comm_bwd_kernel (this step)
    dqc_ptr,                 # (T, B, K, NC*DC) dQ of this step (from _rim_comm_bwd_kernel)
    wq_ptr, whh_ptr,         # input_query (K, H, NI*DK), weight_hh (K, H, G*H)
    cq_ptr, ck_ptr, cv_ptr,  # comm_query/comm_key (K, H, NC*DC), comm_value (K, H, NC*DCV)
    dkc_ptr, dvc_ptr,        # out: (T, B, K, NC*DC|DCV) dK, dV
    dg_ptr,                  # out: (T, B, K, GW) gate gradients (0 for inactive)
    dqi_ptr,                 # out: (T, B, K, NI*DK) input query gradients (0 for inactive)
    dsi_ptr,                 # out: (T, B, K, NI, M) input score gradients * scale (0 inactive)
    B, M, t, t_xw, seed_in, seed_c, p_in, p_c, scale_in,
    K: tl.constexpr, H: tl.constexpr, NI: tl.constexpr, DK: tl.constexpr, NC: tl.constexpr,
    DC: tl.constexpr, DCV: tl.constexpr, G: tl.constexpr, GW: tl.constexpr,
    IS_LSTM: tl.constexpr, BLOCK_INACTIVE: tl.constexpr, HAS_GOUT: tl.constexpr, DROP_IN: tl.constexpr,
    DROP_C: tl.constexpr, BLOCK_B: tl.constexpr, H_P: tl.constexpr, DK_P: tl.constexpr,
    M_P: tl.constexpr, DC_P: tl.constexpr, DCV_P: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    j = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_h = tl.arange(0, H_P)
    offs_m = tl.arange(0, M_P)
    offs_d = tl.arange(0, DC_P)
    offs_v = tl.arange(0, DCV_P)
    offs_e = tl.arange(0, DK_P)
    h_ok = offs_h < H
    ok_h = b_ok[:, None] & h_ok[None, :]
    t64 = t.to(tl.int64)
    BKH = B * K * H
    active = tl.load(mask_ptr + (t64 * B + offs_b) * K + j, mask=b_ok, other=0) != 0
    act = active[:, None]

    # 4. Key/value side of the communication for mechanism j, then dh~_j.
    qc_t = qc_ptr + t64 * B * K * (NC * DC)
    dht = _load_rows(dh_ptr, offs_b, b_ok, j, K, H, 0, H, H_P)  # residual / copy: dh~ = dh'
    kv = tl.zeros((BLOCK_B, H_P), dtype=tl.float32)
    for n in tl.static_range(NC):
        dk = tl.zeros((BLOCK_B, DC_P), dtype=tl.float32)
        dv = tl.zeros((BLOCK_B, DCV_P), dtype=tl.float32)
        for kk in range(K):
            dskj = tl.load(ds_ptr + ((offs_b * K + kk) * NC + n) * K + j, mask=b_ok, other=0.0)
            qk = _load_rows(qc_t, offs_b, b_ok, kk, K, NC * DC, n * DC, DC, DC_P)
            dk += dskj[:, None] * qk
            boff = (((t64 * B + offs_b) * K + kk) * NC + n) * K + j
            bkj = tl.load(bp_ptr + boff, mask=b_ok, other=0.0)
            if DROP_C:
                bkj = bkj * _keep_scale(seed_c, boff.to(tl.int32), p_c)
            dok = _load_rows(do_ptr, offs_b, b_ok, kk, K, NC * DCV, n * DCV, DCV, DCV_P)
            dv += bkj[:, None] * dok
        tl.store(dkc_ptr + ((t64 * B + offs_b[:, None]) * K + j) * (NC * DC) + n * DC
                 + offs_d[None, :], dk, mask=b_ok[:, None] & (offs_d[None, :] < DC))
        tl.store(dvc_ptr + ((t64 * B + offs_b[:, None]) * K + j) * (NC * DCV) + n * DCV
                 + offs_v[None, :], dv, mask=b_ok[:, None] & (offs_v[None, :] < DCV))
        kv += _proj_t(dk, ck_ptr, j, 0, n * DC, H, NC * DC, H, DC, H_P, DC_P, PREC)
        kv += _proj_t(dv, cv_ptr, j, 0, n * DCV, H, NC * DCV, H, DCV, H_P, DCV_P, PREC)
        dq = _load_rows(dqc_ptr + t64 * B * K * (NC * DC), offs_b, b_ok, j, K, NC * DC, n * DC,
                        DC, DC_P)  # zero for inactive j
        dht += _proj_t(dq, cq_ptr, j, 0, n * DC, H, NC * DC, H, DC, H_P, DC_P, PREC)
    if BLOCK_INACTIVE:
        dht += tl.where(act, kv, 0.0)
    else:
        dht += kv

    # 3. Masked cell backward from the saved pre-activations (zero gate gradients if inactive).
    hp = _load_rows(hs_ptr + t64 * BKH, offs_b, b_ok, j, K, H, 0, H, H_P)
    grow = gates_ptr + ((t64 * B + offs_b[:, None]) * K + j) * GW + offs_h[None, :]
    drow = dg_ptr + ((t64 * B + offs_b[:, None]) * K + j) * GW + offs_h[None, :]
    if IS_LSTM:
        dcar = _load_rows(dc_ptr, offs_b, b_ok, j, K, H, 0, H, H_P)
        cp = _load_rows(cs_ptr + t64 * BKH, offs_b, b_ok, j, K, H, 0, H, H_P)
        ig = _sigmoid(tl.load(grow, mask=ok_h, other=0.0))
        fg = _sigmoid(tl.load(grow + H, mask=ok_h, other=0.0))
        gg = _tanh(tl.load(grow + 2 * H, mask=ok_h, other=0.0))
        og = _sigmoid(tl.load(grow + 3 * H, mask=ok_h, other=0.0))
        c_cell = fg * cp + ig * gg
        tc = _tanh(c_cell)
        dct = dcar + dht * og * (1.0 - tc * tc)
        dg0 = tl.where(act, dct * gg * ig * (1.0 - ig), 0.0)
        dg1 = tl.where(act, dct * cp * fg * (1.0 - fg), 0.0)
        dg2 = tl.where(act, dct * ig * (1.0 - gg * gg), 0.0)
        dg3 = tl.where(act, dht * tc * og * (1.0 - og), 0.0)
        dc_prev = tl.where(act, dct * fg, dcar)
        tl.store(dc_ptr + (offs_b[:, None] * K + j) * H + offs_h[None, :], dc_prev, mask=ok_h)
        tl.store(drow, dg0, mask=ok_h)
        tl.store(drow + H, dg1, mask=ok_h)
        tl.store(drow + 2 * H, dg2, mask=ok_h)
        tl.store(drow + 3 * H, dg3, mask=ok_h)
        dh_prev = tl.where(act, 0.0, dht)  # LSTM: d gh = dg (stored above)
    else:
        gi0 = tl.load(grow, mask=ok_h, other=0.0)
        gi1 = tl.load(grow + H, mask=ok_h, other=0.0)
        gi2 = tl.load(grow + 2 * H, mask=ok_h, other=0.0)
        gh0 = tl.load(grow + 3 * H, mask=ok_h, other=0.0)
        gh1 = tl.load(grow + 4 * H, mask=ok_h, other=0.0)
        gh2 = tl.load(grow + 5 * H, mask=ok_h, other=0.0)
        r = _sigmoid(gi0 + gh0)
        z = _sigmoid(gi1 + gh1)
        nn = _tanh(gi2 + r * gh2)
        dnp = dht * (1.0 - z) * (1.0 - nn * nn)
        drp = dnp * gh2 * r * (1.0 - r)
        dzp = dht * (hp - nn) * z * (1.0 - z)
        dg0 = tl.where(act, drp, 0.0)
        dg1 = tl.where(act, dzp, 0.0)
        dg2 = tl.where(act, dnp, 0.0)
        tl.store(drow, dg0, mask=ok_h)
        tl.store(drow + H, dg1, mask=ok_h)
        tl.store(drow + 2 * H, dg2, mask=ok_h)
        tl.store(drow + 3 * H, dg0, mask=ok_h)  # d gh: r and z as gi; n scaled by r
        tl.store(drow + 4 * H, dg1, mask=ok_h)
        tl.store(drow + 5 * H, tl.where(act, dnp * r, 0.0), mask=ok_h)
        dh_prev = tl.where(act, dht * z, dht)
    # dh_{t-1} += dgh weight_hh[j]^T (zero rows for inactive), reading the gradients just stored
    # back in chunks of BLOCK_K gate columns: an (H, H) weight tile per gate in float32 does not
    # fit a program's registers (tools/triton_resources.py). The barrier makes this program's
    # stores visible to all its threads.
    tl.debug_barrier()
    GH = G * H
    dgh_ptr = dg_ptr + ((t64 * B + offs_b[:, None]) * K + j) * GW + (0 if IS_LSTM else GH)
    for q in tl.static_range(G):
        for c0 in range(0, H, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            c_ok = offs_c < H
            dgc = tl.load(dgh_ptr + q * H + offs_c[None, :], mask=b_ok[:, None] & c_ok[None, :],
                          other=0.0)
            wt = tl.load(whh_ptr + j * (H * GH) + offs_h[None, :] * GH + q * H + offs_c[:, None],
                         mask=c_ok[:, None] & h_ok[None, :], other=0.0)  # W[i, qH + c] at (c, i)
            dh_prev += tl.dot(dgc, wt.to(tl.float32), input_precision=PREC)

    # 1. Input attention backward: d a~ = dgi . XW, dropout, null softmax, dq -> dh_{t-1}.
    keys_t = keys_ptr + t64 * B * M * (NI * DK)
    xw_t = xw_ptr + t_xw.to(tl.int64) * B * K * NI * M * (G * H)
    m_ok = b_ok[:, None] & (offs_m[None, :] < M)
    for n in tl.static_range(NI):
        base = ((offs_b[:, None, None] * K + j) * NI + n) * M
        xptr = xw_t + (base + offs_m[None, :, None]) * (G * H) + offs_h[None, None, :]
        xok = b_ok[:, None, None] & (offs_m[None, :, None] < M) & h_ok[None, None, :]
        da = tl.sum(dg0[:, None, :] * tl.load(xptr, mask=xok, other=0.0), axis=2)
        da += tl.sum(dg1[:, None, :] * tl.load(xptr + H, mask=xok, other=0.0), axis=2)
        da += tl.sum(dg2[:, None, :] * tl.load(xptr + 2 * H, mask=xok, other=0.0), axis=2)
        if IS_LSTM:
            da += tl.sum(dg3[:, None, :] * tl.load(xptr + 3 * H, mask=xok, other=0.0), axis=2)
        offs = (((t64 * B + offs_b[:, None]) * K + j) * NI + n) * M + offs_m[None, :]
        if DROP_IN:
            da = da * _keep_scale(seed_in, offs.to(tl.int32), p_in)
        a = tl.load(a_ptr + offs, mask=m_ok, other=0.0)
        ds = a * (da - tl.sum(a * da, axis=1)[:, None]) * scale_in  # null: value 0, no own grad
        ds = tl.where(act, ds, 0.0)
        tl.store(dsi_ptr + offs, ds, mask=m_ok)
        kptr = (keys_t + offs_b[:, None, None] * (M * (NI * DK)) + offs_m[None, :, None] * (NI * DK)
                + n * DK + offs_e[None, None, :])
        kok = b_ok[:, None, None] & (offs_m[None, :, None] < M) & (offs_e[None, None, :] < DK)
        dq = tl.sum(ds[:, :, None] * tl.load(kptr, mask=kok, other=0.0), axis=1)  # (BB, DK_P)
        tl.store(dqi_ptr + ((t64 * B + offs_b[:, None]) * K + j) * (NI * DK) + n * DK
                 + offs_e[None, :], dq, mask=b_ok[:, None] & (offs_e[None, :] < DK))
        dh_prev += _proj_t(dq, wq_ptr, j, 0, n * DK, H, NI * DK, H, DK, H_P, DK_P, PREC)

    if HAS_GOUT:  # out[t-1] is h_{t-1}
        dh_prev += tl.load(gout_ptr + ((t64 - 1) * B + offs_b[:, None]) * (K * H) + j * H
                           + offs_h[None, :], mask=ok_h, other=0.0)
    tl.store(dh_ptr + (offs_b[:, None] * K + j) * H + offs_h[None, :], dh_prev, mask=ok_h)


# ---------------------------------------------------------------- launchers (no autograd here)


def rim_comm_bwd(dh, masks, qc, kc, vc, bp, co, dhp, do, ds, dq, *, t, K, H, NC, DC, DCV, seed,
                 p_drop, prec):
    """Launch :func:`_rim_comm_bwd_kernel` for step ``t`` (all tensors contiguous)."""
    B = dh.shape[0]
    grid = (cdiv(B, BLOCK_B), K)
    _rim_comm_bwd_kernel[grid](
        dh, masks, qc, kc, vc, bp, co, dhp, do, ds, dq, B, t, seed, float(p_drop),
        1.0 / DC ** 0.5, K=K, H=H, NC=NC, DC=DC, DCV=DCV, HAS_DROP=p_drop > 0, BLOCK_B=BLOCK_B,
        H_P=pad_dot(H), K_P=pad(K), DC_P=pad_dot(DC), DCV_P=pad_dot(DCV), PREC=prec,
        num_warps=NUM_WARPS)


def rim_cell_bwd(dh, dc, gout, masks, hs, cs, gates, a, keys, xw, qc, bp, do, ds, dqc, wq, whh,
                 cq, ck, cv, dkc, dvc, dg, dqi, dsi, *, t, M, K, H, NI, DK, NC, DC, DCV, lstm,
                 block_inactive_grad, has_gout, seed, p_in, p_c, prec, t_xw=None):
    """Launch :func:`_rim_cell_bwd_kernel` for step ``t`` (all tensors contiguous). ``has_gout``:
    add ``gout[t-1]`` (the gradient of ``out[t-1] = h_{t-1}``) to the new ``dh``. ``xw`` holds
    step ``t`` at index ``t_xw`` (default ``t``: all steps; a chunk of steps otherwise)."""
    B = dh.shape[0]
    grid = (cdiv(B, BLOCK_B), K)
    _rim_cell_bwd_kernel[grid](
        dh, dc, gout, masks, hs, cs, gates, a, keys, xw, qc, bp, do, ds, dqc, wq, whh, cq, ck, cv,
        dkc, dvc, dg, dqi, dsi, B, M, t, t if t_xw is None else t_xw, seed, seed + 1, float(p_in),
        float(p_c), 1.0 / DK ** 0.5,
        K=K, H=H, NI=NI, DK=DK, NC=NC, DC=DC, DCV=DCV, G=4 if lstm else 3,
        GW=(4 if lstm else 6) * H, IS_LSTM=lstm,
        BLOCK_INACTIVE=bool(block_inactive_grad), HAS_GOUT=bool(has_gout), DROP_IN=p_in > 0,
        DROP_C=p_c > 0, BLOCK_B=BLOCK_B, H_P=pad_dot(H), DK_P=pad_dot(DK), M_P=pad(M),
        DC_P=pad_dot(DC), DCV_P=pad_dot(DCV), BLOCK_K=16, PREC=prec, num_warps=CELL_BWD_WARPS)
